"""A whole step's predicted time (fxmem.cost.step): measured matrix products (fxmem.cost.op_timing),
fused pointwise ops, the microbatch loop's costs."""

import time

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxmem.cost import op_timing
from fxmem.cost import step as step_costs
from fxmem.cost.model import cpu_spec, node_time
from fxmem.cost.op_timing import measured_seconds
from fxmem.cost.step import StepCosts, node_step_seconds, step_seconds

aten = torch.ops.aten


def _graph(f, *args):
    return make_fx(f, tracing_mode="fake")(*args)


def _one(gm, target):
    return next(n for n in gm.graph.nodes if n.target == target)


@pytest.fixture(autouse=True)
def _fresh():
    kept = dict(op_timing._MEASURED)
    op_timing.clear_measured()
    yield
    op_timing.clear_measured()
    op_timing._MEASURED.update(kept)


def test_a_matrix_product_is_measured_once_per_signature(monkeypatch):
    gm = _graph(lambda a, b: torch.relu(a @ b), torch.randn(32, 16), torch.randn(16, 8))
    mm = _one(gm, aten.mm.default)
    calls = []
    monkeypatch.setattr(op_timing, "_best_seconds", lambda fn, device, **kw: (
        calls.append(fn()) and 0) or 1.5e-3)
    spec = cpu_spec()
    assert node_step_seconds(mm, spec, StepCosts()) == 1.5e-3
    assert node_step_seconds(mm, spec, StepCosts()) == 1.5e-3
    assert len(calls) == 1 and op_timing.measured_count() == 1  # kept for the process
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
    """Where it is measured (eager lowering, an Inductor fallback): timed, its indices random
    within the indexed size, not all zeros."""
    def densify(values, indices):
        return values.new_zeros(64).index_put([indices], values, accumulate=True)

    gm = _graph(densify, torch.randn(16), torch.arange(16))
    node = _one(gm, aten.index_put.default)
    seen = []
    real = op_timing._best_seconds
    monkeypatch.setattr(op_timing, "_index_args", lambda n, d, _f=op_timing._index_args: (
        seen.append(_f(n, d)) or seen[-1]))
    monkeypatch.setattr(op_timing, "_best_seconds", lambda fn, device, **kw: real(fn, device))
    assert measured_seconds(node) > 0
    (_, [index], _, _), _ = seen[0]
    assert index.min() >= 0 and index.max() < 64 and index.unique().numel() > 1


def test_indexing_ops_inductor_lowers_are_priced_as_fused(monkeypatch):
    """The sparse lever's transient dense weight (an accumulating put, int32 indices) and its
    values' gradient (an index read), an embedding's backward, a gather: Inductor lowers them to
    fused loops, so they are priced like pointwise ops (not timed as ATen's kernels, whose
    accumulating put sorts its indices: 0.37 ms against Inductor's 0.04-0.13 ms per layer on
    the bench GPT decoder); with eager lowering they are measured."""
    n = 4096
    gm = _graph(lambda v, i, g, t, x: (v.new_zeros(n).index_put([i], v, accumulate=True),
                                       g.reshape(-1)[i], x.gather(1, t)),
                torch.randn(512), torch.randint(0, n, (512,), dtype=torch.int32),
                torch.randn(64, 64), torch.randint(0, 4, (8, 2)), torch.randn(8, 4))
    spec, costs = cpu_spec(), StepCosts()
    nodes = [_one(gm, t) for t in (aten.index_put.default, aten.index.Tensor,
                                   aten.gather.default)]
    assert not any(step_costs.inductor_falls_back(x) for x in nodes)
    calls = []
    monkeypatch.setattr(step_costs, "measured_seconds", lambda node: calls.append(node) or 1.0)
    put, read, gather = (node_step_seconds(x, spec, costs) for x in nodes)
    assert not calls
    assert put == pytest.approx(n * 4 / spec.bytes_per_s + costs.fused_op_s)  # bytes written
    assert read == pytest.approx(512 * 4 / spec.bytes_per_s + costs.fused_op_s)
    assert gather == pytest.approx(8 * 2 * 4 / spec.bytes_per_s + costs.fused_op_s)
    eager = StepCosts(lowering="eager")
    assert [node_step_seconds(x, spec, eager) for x in nodes] == [1.0, 1.0, 1.0]


def test_indexing_ops_inductor_runs_as_aten_kernels_are_measured(monkeypatch):
    """Inductor's own fallbacks: a boolean index, an accumulating put into int64,
    deterministic algorithms."""
    mask, x = torch.rand(64) > 0.5, torch.randn(64)
    gm = _graph(lambda x, m, v, c, i: (x[m], x.index_put([m], v), c.index_put([i], c[:8], True),
                                       x.index_put([i], x[:8], True)),
                x, mask, torch.randn(int(mask.sum())), torch.arange(64),
                torch.randint(0, 64, (8,)))
    read, put_bool, put_int64, put_float = [x for x in gm.graph.nodes if x.target in (
        aten.index.Tensor, aten.index_put.default)][-4:]
    assert all(map(step_costs.inductor_falls_back, (read, put_bool, put_int64)))
    assert not step_costs.inductor_falls_back(put_float)
    calls = []
    monkeypatch.setattr(step_costs, "measured_seconds", lambda node: calls.append(node) or 1.0)
    spec, costs = cpu_spec(), StepCosts()
    assert [node_step_seconds(x, spec, costs) for x in (read, put_bool, put_int64)] == [1.0] * 3
    assert node_step_seconds(put_float, spec, costs) < 1.0
    torch.use_deterministic_algorithms(True)
    try:
        assert step_costs.inductor_falls_back(put_float)
    finally:
        torch.use_deterministic_algorithms(False)


def test_inductor_runs_no_aten_kernel_for_a_fused_indexing_op():
    """The rule against Inductor itself: the sparse lever's densify compiled for a CPU runs no
    ATen indexing kernel; a boolean-indexed put does."""
    from torch.profiler import ProfilerActivity, profile

    from fxmem.levers.sparse.functions import densify

    def ran(fn, *args):
        compiled = torch.compile(fn, backend="inductor", fullgraph=True)
        compiled(*args)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            compiled(*args)
        return {e.key for e in prof.key_averages()}

    values, indices = torch.randn(16), torch.randperm(64)[:16].to(torch.int32)
    gm = _graph(lambda v, i: torch.index_put(v.new_zeros(64), [i], v, accumulate=True),
                values, indices)  # densify as the step's graphs have it
    assert not step_costs.inductor_falls_back(_one(gm, aten.index_put.default))
    assert not {"aten::index_put_", "aten::index_put", "aten::_index_put_impl_"} & ran(
        lambda v, i: densify(v, i, (8, 8)) * 2.0, values, indices)
    mask = torch.arange(64) % 3 == 0
    bool_put = _graph(lambda x, m, v: x.index_put([m], v), torch.randn(64), mask,
                      torch.randn(int(mask.sum())))
    assert step_costs.inductor_falls_back(_one(bool_put, aten.index_put.default))
    assert {"aten::index_put_", "aten::_index_put_impl_"} & ran(
        lambda x, m, v: x.index_put([m], v) * 2.0, torch.randn(64), mask,
        torch.randn(int(mask.sum())))


def test_a_call_longer_than_the_budget_is_timed_once_a_short_one_many_times():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.03)

    assert op_timing._best_seconds(slow, torch.device("cpu"), budget_s=0.01) >= 0.03
    assert len(calls) == 2  # the warm-up and one timed call
    calls.clear()
    assert op_timing._best_seconds(lambda: calls.append(1), torch.device("cpu")) < 0.01
    assert len(calls) == 51  # the warm-up and 50 (the cap) within 0.1 s


@pytest.mark.parametrize("make, shapes, sliced", [
    (lambda a, w: a @ w.t(), [(96, 16), (1001, 16)], [((96, 16), (16, 1001 % 64 + 64 * 4))]),
    (lambda g, x: g.t() @ x, [(96, 1001), (96, 16)], [((1001 % 64 + 64 * 4, 96), (96, 16))]),
    (lambda b, x, w: torch.addmm(b, x, w), [(1001,), (96, 16), (16, 1001)],
     [((1001 % 64 + 64 * 4,), (96, 16), (16, 1001 % 64 + 64 * 4))]),
    (torch.bmm, [(1001, 4, 8), (1001, 8, 4)],
     [((1001 % 64 + 64 * 4, 4, 8), (1001 % 64 + 64 * 4, 8, 4))]),
])
def test_a_large_product_is_measured_on_a_slice_of_its_largest_output_dimension(
        monkeypatch, make, shapes, sliced):
    """Scaled by the whole extent over the slice's; the slice's extent the whole's modulo 64,
    its inputs' strides the whole's (a transposed weight stays transposed)."""
    gm = _graph(make, *[torch.randn(s) for s in shapes])
    node = next(n for n in gm.graph.nodes if n.target in op_timing._SLICEABLE)
    monkeypatch.setattr(op_timing, "SLICE_FLOPS", 1)  # every product is large
    seen = []

    def best(fn, device, **kw):
        seen.append(fn)
        return 0.5

    monkeypatch.setattr(op_timing, "_best_seconds", best)
    real = op_timing._slice_of
    made = []
    monkeypatch.setattr(op_timing, "_slice_of", lambda t, dim, extent, device: made.append(
        real(t, dim, extent, device)) or made[-1])
    seconds = measured_seconds(node)
    assert len(seen) == 1 and seconds == pytest.approx(0.5 * 1001 / (1001 % 64 + 64 * 4))
    values = {tuple(t.shape) for t in made}
    assert values == {s for s in sliced[0] if s in values} and len(made) >= 1
    for t in made:
        whole = next(n for n in node.args if tuple(n.meta["val"].shape)[1:] == tuple(t.shape)[1:]
                     or tuple(n.meta["val"].shape)[:1] == tuple(t.shape)[:1])
        assert t.stride() == whole.meta["val"].stride()


def test_a_slice_that_runs_too_fast_grows_then_the_product_is_measured_whole(monkeypatch):
    gm = _graph(lambda a, b: a @ b, torch.randn(2048, 8), torch.randn(8, 8))
    node = _one(gm, aten.mm.default)
    monkeypatch.setattr(op_timing, "SLICE_FLOPS", 1)
    calls = []
    monkeypatch.setattr(op_timing, "_best_seconds", lambda fn, device, **kw: (
        calls.append(fn) and 0) or 1e-6)
    assert measured_seconds(node) == 1e-6  # 256 rows, then 1024, then the whole
    assert len(calls) == 3
    assert op_timing.sliced_seconds(_one(_graph(lambda a, b: a @ b, torch.randn(64, 8),
                                                 torch.randn(8, 8)), aten.mm.default),
                                      torch.device("cpu")) is None  # too small to slice


def test_a_sliced_product_predicts_the_whole_within_the_noise():
    """On the device: a slice's time scaled is near the whole's (wide bounds: a busy machine;
    one thread: two threads' small slices wait on a shared core's other work)."""
    gm = _graph(lambda a, w: a @ w.t(), torch.randn(256, 256), torch.randn(4001, 256))
    node = _one(gm, aten.mm.default)
    old = op_timing.SLICE_FLOPS, op_timing.SLICE_MIN_S, torch.get_num_threads()
    op_timing.SLICE_FLOPS, op_timing.SLICE_MIN_S = 1e8, 0.0
    torch.set_num_threads(1)
    try:
        sliced = op_timing.sliced_seconds(node, torch.device("cpu"))
        a, w = torch.randn(256, 256), torch.randn(4001, 256)
        whole = op_timing._best_seconds(lambda: a @ w.t(), torch.device("cpu"), calls=5)
    finally:
        op_timing.SLICE_FLOPS, op_timing.SLICE_MIN_S = old[:2]
        torch.set_num_threads(old[2])
    assert sliced is not None and whole / 3 < sliced < 3 * whole


def test_a_slice_of_a_large_output_writes_into_a_new_mapping(monkeypatch):
    """On a CPU an output over 32 MiB is mapped afresh at every call: a slice of such a product
    writes into a new mapping too (here every output counts as large)."""
    gm = _graph(lambda a, w: a @ w.t(), torch.randn(64, 32), torch.randn(1001, 32))
    node = _one(gm, aten.mm.default)
    monkeypatch.setattr(op_timing, "SLICE_FLOPS", 1)
    monkeypatch.setattr(op_timing, "SLICE_MIN_S", 0.0)
    monkeypatch.setattr(op_timing, "_MAPPED_BYTES", 0)
    shapes = []
    real = op_timing._into_fresh
    monkeypatch.setattr(op_timing, "_into_fresh", lambda op, args, kwargs, shape, dtype: (
        shapes.append(shape), real(op, args, kwargs, shape, dtype))[1])
    assert measured_seconds(node) > 0
    assert shapes and set(shapes) == {(64, 1001 % 64 + 64 * 4)}
