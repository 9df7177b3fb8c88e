"""Sparse weights really save memory: measured with the allocator, predicted by fxmem's memory
model, and planned by fxmem.optimize like any model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmem
from fxmem.levers.sparse import SparsityReport, sparsify
from fxmem.planning.options import OPTIMIZER_STEP
from tests.helpers import EAGER_RECOMPUTE, assert_same_grads, grads_of, measured_grads

WIDTH, DEPTH = 256, 4


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[m for _ in range(DEPTH)
                                      for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())])

    def forward(self, x, y):
        return F.cross_entropy(self.layers(x), y)


def _build(density):
    model = _MLP()
    if density is not None:  # every layer sparse: the bytes measured are the sparse layers'
        sparsify(model, density, distribution="uniform", keep_dense=None)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, WIDTH, generator=g), torch.randint(0, WIDTH, (32,), generator=g)


def _resident_after_a_step(density, x, y):
    """Bytes the allocator holds after building the model, an Adam step, gradients kept:
    parameters (and index buffers) + gradients + Adam state."""
    held = {}

    def run():
        model = _build(density)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(x, y).backward()
        opt.step()
        held["model"], held["opt"] = model, opt

    m = fxmem.measure_memory(run, device="cpu", baseline=0)
    return m.end - m.start, held["model"], held["opt"]


def test_at_90_percent_sparsity_parameters_gradients_and_adam_state_take_under_20_percent():
    x, y = _inputs()
    dense_bytes, _, _ = _resident_after_a_step(None, x, y)
    sparse_bytes, model, opt = _resident_after_a_step(0.1, x, y)
    assert sparse_bytes <= 0.20 * dense_bytes, (sparse_bytes, dense_bytes)
    # the model's prediction of the same bytes (at the optimizer step, every gradient alive)
    est = fxmem.estimate(model, x, y, optimizer=opt)
    at_step = est.breakdown(est.timeline.labels.index(OPTIMIZER_STEP))
    predicted = sum(at_step[k] for k in ("parameters", "buffers", "gradients", "optimizer state"))
    assert predicted == pytest.approx(sparse_bytes, rel=0.03)
    report = model.sparsity.report(opt)
    assert isinstance(report, SparsityReport) and report.ratio < 0.2
    assert report.sparse_bytes == pytest.approx(sparse_bytes, rel=0.03)
    assert "sparse / dense" in str(report) and "layers.0" in str(report)


def test_the_memory_model_predicts_the_measured_step_peak_within_3_percent():
    x, y = _inputs()
    _, model, opt = _resident_after_a_step(0.1, x, y)
    opt.zero_grad()

    def step():
        model(x, y).backward()
        opt.step()
        opt.zero_grad()

    peak = fxmem.measure_memory(step, device="cpu", baseline=[model, opt, x, y]).peak
    predicted = fxmem.estimate(model, x, y, optimizer=opt).peak
    assert predicted == pytest.approx(peak, rel=0.03), (predicted, peak)


def test_a_sparsified_tiny_gpt_trains_through_fxmem_optimize_under_its_budget(tiny_gpt,
                                                                              budget_between):
    model, args, kwargs = tiny_gpt()
    sparsify(model, 0.1)
    budget = budget_between(model, args, kwargs, fraction=0.5, time_limit=2, **EAGER_RECOMPUTE)
    om = fxmem.optimize(model, budget, time_limit=5, **EAGER_RECOMPUTE)
    expected = grads_of(model, model, *args)
    got, peak = measured_grads(model, om, args)
    assert peak <= budget, (peak, budget, om.plan.report())
    assert om.plan.predicted_peak == pytest.approx(peak, rel=0.01)
    assert_same_grads(expected, got)
    # prune and regrow between steps: the planned step reads the new masks
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    om.sparsity.attach(opt, every=1, method="rigl")
    om(*args).backward()
    opt.step()
    opt.zero_grad()
    assert om.sparsity.step(*args).moved > 0
    assert_same_grads(grads_of(model, model, *args), grads_of(model, om, *args))
    assert len(om.plans) == 1  # not planned again


def test_the_csr_kernel_is_traced_and_planned_too(tiny_gpt):
    model, args, _ = tiny_gpt(dropout=0.0, n_layer=1)
    sparsify(model, 0.1, kernel="csr")
    om = fxmem.optimize(model, 2**40, **EAGER_RECOMPUTE)
    expected = grads_of(model, model, *args)
    got, peak = measured_grads(model, om, args)
    assert peak == om.plan.predicted_peak  # what torch.sparse allocates inside is transient
    assert_same_grads(expected, got, rtol=1e-4, atol=1e-6)
    assert "csr_linear" in om.plan.graphs["forward"].code


def test_the_index_buffers_the_backward_reads_are_counted_in_the_plan(tiny_gpt):
    """The recompute pass hands the backward a copy of each buffer it reads (taken before the
    forward's writes); the memory model counts that copy until the backward is done with it
    (it used to see the buffer itself, and the plan was short by the indices' bytes)."""
    model, args, _ = tiny_gpt(dropout=0.0, n_layer=1)
    sparsify(model, 0.1)
    om = fxmem.optimize(model, 2**40, **EAGER_RECOMPUTE)
    measured_grads(model, om, args)  # planned and run once
    _, peak = measured_grads(model, om, args)
    assert "clone" in om.plan.graphs["forward"].code
    assert peak == om.plan.predicted_peak
