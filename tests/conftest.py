"""Shared pytest configuration."""

import gc
import os
import sys
from pathlib import Path

# Make the repository root importable (for ``fxmem`` in a non-installed checkout and for
# the ``bench`` package, which is not installed) regardless of how pytest is started.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


# Under pytest-xdist (``make test`` runs one worker per CPU), each worker's torch gets its share of
# the CPUs: oversubscribed threads would slow the solver, whose limits are wall-clock seconds.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    import torch

    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_collection_finish(session):
    """Freeze what the imports made (torch, fxmem, transformers: some 500k objects) out of the
    garbage collector's reach: every ``gc.collect()`` -- fxmem.measure_memory calls one per
    measurement, and planning measures kernel scratch once per op shape -- otherwise walks them
    all, about a second each on a loaded 2-core machine (a third of a tiny plan's time). Only
    objects alive after collection are frozen (modules, classes; no test makes a tensor or a
    model at import), so what the tests make is collected, and seen by ``gc.get_objects()``,
    as before."""
    if os.environ.get("FXMEM_TEST_NO_GC_FREEZE"):
        return
    gc.collect()
    gc.freeze()


# ---------------------------------------------------------------- shared fixtures
# Session-scoped factories (plain functions in tests.helpers), so hypothesis tests may use them.

import pytest  # noqa: E402

from tests import helpers  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gpt():
    """``tiny_gpt(**overrides) -> (model, (idx, targets), {})``: the tests' one tiny GPT
    (2 layers, d_model 64, batch 4 x 64 tokens, dropout 0.1 unless overridden)."""
    return helpers.make_tiny_gpt


@pytest.fixture(scope="session")
def same_grads():
    """``same_grads(model, call, *args, expected=None, seed=1, rtol=..., atol=..., **kwargs)``:
    the loss and gradients of one step through ``call`` equal eager ``model``'s (computed first
    unless ``expected`` is given, under one seed: dropout masks match); returns both."""

    def check(model, call, *args, expected=None, seed=1, rtol=None, atol=None, **kwargs):
        if expected is None:
            expected = helpers.grads_of(model, model, *args, seed=seed, **kwargs)
        got = helpers.grads_of(model, call, *args, seed=seed, **kwargs)
        tolerances = {} if rtol is None and atol is None else {"rtol": rtol, "atol": atol}
        helpers.assert_same_grads(expected, got, **tolerances)
        return expected, got

    return check


@pytest.fixture(scope="session")
def budget_between():
    """``budget_between(model, args, kwargs=None, fraction=0.5, **optimize_options)``: a budget
    ``fraction`` of the way from the step's floor to its unoptimised peak (both from one plan,
    cached per model and input shapes)."""
    return helpers.budget_between
