"""A whole step's predicted time (fxmem.cost.step): measured matrix products, fused pointwise ops,
the microbatch loop's costs."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxmem.cost import step as step_costs
from fxmem.cost.model import cpu_spec, node_time
from fxmem.cost.step import StepCosts, measured_seconds, node_step_seconds, step_seconds

aten = torch.ops.aten


def _graph(f, *args):
    return make_fx(f, tracing_mode="fake")(*args)


def _one(gm, target):
    return next(n for n in gm.graph.nodes if n.target == target)


@pytest.fixture(autouse=True)
def _fresh():
    kept = dict(step_costs._MEASURED)
    step_costs.clear_measured()
    yield
    step_costs.clear_measured()
    step_costs._MEASURED.update(kept)


def test_a_matrix_product_is_measured_once_per_signature(monkeypatch):
    gm = _graph(lambda a, b: torch.relu(a @ b), torch.randn(32, 16), torch.randn(16, 8))
    mm = _one(gm, aten.mm.default)
    calls = []
    monkeypatch.setattr(step_costs, "_best_seconds", lambda fn, device, **kw: (
        calls.append(fn()) and 0) or 1.5e-3)
    spec = cpu_spec()
    assert node_step_seconds(mm, spec, StepCosts()) == 1.5e-3
    assert node_step_seconds(mm, spec, StepCosts()) == 1.5e-3
    assert len(calls) == 1 and step_costs.measured_count() == 1  # kept for the process
    assert calls[0].shape == (32, 8)  # run on real inputs like the traced ones
    assert node_step_seconds(mm, spec, StepCosts(measure=False)) == node_time(mm, spec)


def test_bf16_products_are_priced_as_measured_not_at_the_fp32_rate():
    a, b = torch.randn(128, 256), torch.randn(256, 256)
    fp32 = _one(_graph(torch.mm, a, b), aten.mm.default)
    bf16 = _one(_graph(torch.mm, a.bfloat16(), b.bfloat16()), aten.mm.default)
    spec = cpu_spec()  # no bf16 rate: the roofline prices both the same
    assert node_time(fp32, spec) == node_time(bf16, spec)
    assert measured_seconds(fp32) > 0 and measured_seconds(bf16) > 0


def test_pointwise_ops_are_priced_as_fused_under_inductor():
    gm = _graph(lambda x: torch.relu(x * 2.0), torch.randn(64, 64))
    mul = _one(gm, aten.mul.Tensor)
    spec, costs = cpu_spec(), StepCosts()
    written = 64 * 64 * 4
    assert node_step_seconds(mul, spec, costs) == pytest.approx(
        written / spec.bytes_per_s + costs.fused_op_s)
    eager = StepCosts(lowering="eager")
    assert node_step_seconds(mul, spec, eager) == node_time(mul, spec)
    with pytest.raises(ValueError):
        StepCosts(lowering="tpu")


def test_microbatches_repeat_the_graphs_and_add_the_loop_and_the_accumulation():
    forward = _graph(lambda x: x * 2.0, torch.randn(8, 8))
    backward = _graph(lambda g: (g * 3.0, g + 1.0), torch.randn(16, 16))  # two "gradients"
    spec, costs = cpu_spec(), StepCosts()
    one = step_seconds([forward, backward], spec=spec, costs=costs)
    two = step_seconds([forward, backward], microbatches=2, spec=spec, costs=costs)
    grads = 2 * 16 * 16 * 4
    assert two == pytest.approx(2 * (one + costs.microbatch_s) + 3 * grads / spec.bytes_per_s)
    assert step_seconds([]) == 0.0


def test_a_csr_product_is_measured_on_a_valid_pattern():
    from fxmem.levers.sparse.kernels import csr_linear
    from fxmem.levers.sparse.layers import SparseLinear
    from fxmem.levers.sparse.sparsify import initial_indices

    torch.manual_seed(0)
    dense = torch.nn.Linear(32, 16)
    layer = SparseLinear.from_dense(dense, initial_indices(dense.weight, 50))
    layer.set_kernel("csr")
    x = torch.randn(4, 32)
    gm = make_fx(lambda x, v, i, crow, col: csr_linear(x, v, i, crow, col, 16),
                 tracing_mode="fake")(x, layer.values.detach(), layer.indices, layer.crow,
                                      layer.col)
    node = next(n for n in gm.graph.nodes if "csr_linear" in str(n.target))
    assert node_time(node, cpu_spec()) > 0 and measured_seconds(node) > 0


def test_the_meta_device_is_not_measured():
    with torch.device("meta"):
        a = torch.empty(8, 8)
    gm = _graph(torch.mm, a, a)
    mm = _one(gm, aten.mm.default)
    assert measured_seconds(mm) is None
    assert node_step_seconds(mm, cpu_spec(), StepCosts()) == node_time(mm, cpu_spec())


def test_an_accumulating_index_put_is_measured_on_valid_indices(monkeypatch):
    """Inductor does not fuse it on a CPU (the sparse lever's transient dense weight): timed,
    its indices random within the indexed size, not all zeros."""
    def densify(values, indices):
        return values.new_zeros(64).index_put([indices], values, accumulate=True)

    gm = _graph(densify, torch.randn(16), torch.arange(16))
    node = _one(gm, aten.index_put.default)
    seen = []
    real = step_costs._best_seconds
    monkeypatch.setattr(step_costs, "_index_args", lambda n, d, _f=step_costs._index_args: (
        seen.append(_f(n, d)) or seen[-1]))
    monkeypatch.setattr(step_costs, "_best_seconds", lambda fn, device, **kw: real(fn, device))
    assert measured_seconds(node) > 0
    (_, [index], _, _), _ = seen[0]
    assert index.min() >= 0 and index.max() < 64 and index.unique().numel() > 1
