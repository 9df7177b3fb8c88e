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


# ---------------------------------------------------------------- scheduling (make test)
# ``--dist loadscope`` keeps a module on one worker, and xdist hands the modules out by how many
# tests they hold (most first): the few-test heavy modules (a minute or more each on 2 cores) went
# last, so one worker ran them for minutes after the other had finished. These go first, longest
# first (a clean-clone run's durations, after the gc freeze above); the rest follow in xdist's
# order. A worker is given its next module only when it has one test left (xdist gave it at three
# left, so a worker took a heavy module while the other was about to be idle).
HEAVY_MODULES = (
    "tests/test_bench_workloads.py",
    "tests/test_bench_workloads_inductor.py",
    "tests/api/test_defaults.py",
    "tests/levers/precision/test_fp16.py",
    "tests/levers/microbatch/test_exact_random.py",
    "tests/api/test_backend_precision.py",
    "tests/api/test_optimize.py",
    "tests/planning/test_joint.py",
    "tests/levers/precision/test_numerics.py",
    "tests/api/test_estimate.py",
    "tests/test_gpu_check.py",
    "tests/distributed/test_gloo_ranks.py",
    "tests/integrations/test_huggingface.py",
)


def heavy_first(scopes):
    """The next scope to hand out of ``scopes`` (xdist's queue order): the first of
    ``HEAVY_MODULES`` still queued, else xdist's next."""
    rank = {m: i for i, m in enumerate(HEAVY_MODULES)}
    return min(enumerate(scopes), key=lambda e: (rank.get(e[1], len(rank)), e[0]))[1]


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None  # xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class HeavyFirst(LoadScopeScheduling):
        def _assign_work_unit(self, node):
            self.workqueue.move_to_end(heavy_first(list(self.workqueue)), last=False)
            super()._assign_work_unit(node)

        def _reschedule(self, node):
            # a worker runs a test once it knows the next one (or is told to stop), so the
            # next module goes out with one test left, not none
            if (not node.shutting_down and self.workqueue
                    and self._pending_of(self.assigned_work[node]) > 1):
                return
            super()._reschedule(node)

    return HeavyFirst(config, log)


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
