import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fxmem.graph.capture import capture_step
from fxmem.cost.model import (
    H100,
    DeviceSpec,
    calibrate,
    cpu_spec,
    graph_costs,
    node_bytes,
    node_flops,
    node_time,
    profile_costs,
    spec_for,
)

aten = torch.ops.aten


def trace(f, *args):
    return make_fx(f, tracing_mode="fake")(*args)


def ops(gm, target=None):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and (target is None or n.target == target)]


def one(gm, target):
    (node,) = ops(gm, target)
    return node


def counted(f, *args):
    with FlopCounterMode(display=False) as counter:
        f(*args)
    return counter.get_total_flops()


def test_mm_flops_exact():
    a, b = torch.randn(64, 128), torch.randn(128, 256)
    gm = trace(torch.mm, a, b)
    node = one(gm, aten.mm.default)
    assert node_flops(node) == 2 * 64 * 128 * 256 == counted(torch.mm, a, b)
    assert node_bytes(node) == (64 * 128 + 128 * 256 + 64 * 256) * 4


def conv_step(x, w, b):  # forward and backward: convolution and convolution_backward
    y = F.conv2d(x, w, b, stride=2, padding=1)
    return torch.autograd.grad(y.square().sum(), [x, w, b])


@pytest.mark.parametrize("f, shapes", [
    (torch.addmm, [(32, 48), (32, 64), (64, 48)]),
    (torch.bmm, [(4, 16, 32), (4, 32, 8)]),
    (lambda x, w: F.conv2d(x, w, stride=2, padding=1, groups=2), [(2, 4, 16, 16), (6, 2, 3, 3)]),
    (lambda x, w: F.linear(x, w), [(3, 5, 16), (24, 16)]),
])
def test_flops_match_flop_counter(f, shapes):
    args = [torch.randn(s) for s in shapes]
    gm = trace(f, *args)
    total = sum(node_flops(n) for n in gm.graph.nodes)
    assert total > 0 and total == counted(f, *args)


def test_convolution_backward_flops_match_flop_counter():
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    w, b = torch.randn(8, 3, 3, 3, requires_grad=True), torch.randn(8, requires_grad=True)
    gm = trace(conv_step, x, w, b)
    assert node_flops(one(gm, aten.convolution_backward.default)) > 0
    assert sum(node_flops(n) for n in gm.graph.nodes) == counted(conv_step, x, w, b)


def test_attention_flops():
    """The CPU flash kernels get the registry's SDPA formulas: 4*B*H*L*S*D forward (what the math
    backend's two bmms count under FlopCounterMode), 2.5x that backward (scores recomputed)."""
    B, H, L, D = 2, 4, 32, 16
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))

    def step(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(out.square().sum(), [q, k, v])

    gm = trace(step, q, k, v)
    fwd = one(gm, aten._scaled_dot_product_flash_attention_for_cpu.default)
    bwd = one(gm, aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    assert node_flops(fwd) == 4 * B * H * L * L * D
    assert node_flops(bwd) == 5 * node_flops(fwd) // 2
    with sdpa_kernel(SDPBackend.MATH):
        assert node_flops(fwd) == counted(F.scaled_dot_product_attention, q, k, v)


def test_pointwise_costs_its_bytes_and_views_are_free():
    x = torch.randn(1024, 1024)  # 1M fp32 elements
    gm = trace(lambda x: F.gelu(x).t().expand(2, -1, -1).view(2, 1024, 1024).detach(), x)
    gelu = one(gm, aten.gelu.default)
    assert node_flops(gelu) == 0
    assert node_bytes(gelu) == 2 * 4 * 2**20  # read + write
    views = [n for n in ops(gm) if n is not gelu]
    assert {str(n.target) for n in views} == {"aten.t.default", "aten.expand.default",
                                              "aten.view.default", "aten.detach.default"}
    for spec in (H100, cpu_spec()):
        assert node_time(gelu, spec) > 0
        assert node_time(gelu, spec) == pytest.approx(8 * 2**20 / spec.bytes_per_s
                                                      + spec.op_overhead_s)
        for n in views:
            assert node_bytes(n) == node_time(n, spec) == 0


def test_getitem_unsafe_view_and_placeholders_are_free_inplace_ops_are_not():
    def f(x, y):
        a, b = x.split(2)
        c = torch.matmul(a.unsqueeze(0), y.t())  # matmul folds batch dims: _unsafe_view
        x.add_(1)
        return c, b

    gm = trace(f, torch.randn(4, 8), torch.randn(6, 8))
    free = [n for n in gm.graph.nodes if n.op != "call_function" or n.target in (
        operator.getitem, aten.split.Tensor, aten.t.default, aten._unsafe_view.default,
        aten.unsqueeze.default, aten.view.default)]
    assert any(n.target == aten._unsafe_view.default for n in free)
    assert all(node_bytes(n) == 0 and node_time(n, H100) == 0 for n in free)
    add_ = one(gm, aten.add_.Tensor)
    assert node_bytes(add_) == 2 * 4 * 8 * 4 and node_time(add_, H100) > 0


def test_allocation_and_broadcast_bytes():
    def f(x):
        e = torch.empty_like(x)  # allocation only: no bytes
        o = torch.ones_like(x)  # writes its output, reads nothing of x
        return e, o, x.expand(8, 100, 100).clone()  # the clone reads x once, writes 8 copies

    gm = trace(f, torch.randn(1, 100, 100))
    assert node_bytes(one(gm, aten.empty_like.default)) == 0
    assert node_time(one(gm, aten.empty_like.default), H100) == 0
    assert node_bytes(one(gm, aten.ones_like.default)) == 4 * 100 * 100
    assert node_bytes(one(gm, aten.clone.default)) == 4 * 100 * 100 * (1 + 8)


def test_bf16_matmul_faster_than_fp32_on_h100():
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(1024, 1024, dtype=dtype)
        times[dtype] = node_time(one(trace(torch.mm, a, a), aten.mm.default), H100)
    assert times[torch.bfloat16] < times[torch.float32]
    assert times[torch.float32] == pytest.approx(2 * 1024**3 / 67e12 + 5e-6)


def test_specs():
    assert H100.flops_rate(torch.float32) == 67e12
    assert H100.flops_rate(torch.bfloat16) == H100.flops_rate(torch.float16) == 989e12
    assert H100.bytes_per_s == 3.35e12 and H100.flops_rate(torch.float64) == 67e12
    cpu = cpu_spec()
    assert cpu.flops_rate(torch.bfloat16) == cpu.flops_rate(torch.float32) > 0
    assert spec_for("cpu") == spec_for(torch.device("meta")) == cpu
    assert spec_for("cuda") is H100  # no CUDA here: the H100 default, logged
    assert hash(cpu) == hash(cpu_spec()) and {H100: 1}[H100] == 1
    with pytest.raises(ValueError):
        DeviceSpec("bad", {torch.bfloat16: 1e12}, 1e9, 1e-6)
    with pytest.raises(TypeError):
        H100.flops_per_s[torch.float32] = 1.0


def test_calibrate_cpu():
    spec = calibrate("cpu", seconds=0.3)
    rates = [spec.flops_rate(torch.float32), spec.bytes_per_s, spec.op_overhead_s]
    assert all(math.isfinite(r) and r > 0 for r in rates)
    assert spec.op_overhead_s < 1e-3
    assert math.isfinite(spec.flops_per_s[torch.bfloat16]) and spec.flops_per_s[torch.bfloat16] > 0
    assert torch.float16 not in spec.flops_per_s  # on a CPU: fp16 priced at fp32's rate
    with pytest.raises(ValueError):
        calibrate("meta")


def test_graph_costs_cover_every_node_of_a_captured_step():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(16, 4))
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x), y)

    gm = capture_step(model, (x, y), loss_fn=loss_fn).gm
    costs = graph_costs(gm, H100)
    assert list(costs) == [n.name for n in gm.graph.nodes]
    assert all(c == 0 for n, c in zip(gm.graph.nodes, costs.values()) if n.op != "call_function")
    assert sum(node_flops(n) for n in gm.graph.nodes) == counted(
        lambda: loss_fn(model, x, y).backward())
    profiled = profile_costs(gm, "cpu")
    assert list(profiled) == list(costs)
    assert all((profiled[k] > 0) == (costs[k] > 0) for k in costs)
    assert not profiled.fallbacks  # embedding-free step: every op runs on random inputs


@pytest.fixture
def one_thread():
    """Timings compared against each other: one intra-op thread, so that a sibling thread that a
    busy (shared, 2-core) machine deschedules does not stall a whole op at a barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_profile_costs_on_cpu(one_thread):
    def f(big, small, idx, table):
        return (big @ big, small @ small, small @ small, small @ small, big.t(),
                F.embedding(idx, table))

    args = (torch.randn(512, 512), torch.randn(64, 64), torch.randint(0, 10, (4, 7)),
            torch.randn(10, 3))
    gm = trace(f, *args)
    costs = profile_costs(gm, "cpu", repeats=5)
    assert set(costs) == {n.name for n in gm.graph.nodes}
    mms = ops(gm, aten.mm.default)
    assert costs[mms[0].name] > costs[mms[1].name] > 0
    assert costs[mms[1].name] == costs[mms[2].name] == costs[mms[3].name]  # one timing, reused
    assert costs.measured == 3 and costs.reused == 2 and not costs.fallbacks  # mm x2, embedding
    assert costs[one(gm, aten.t.default).name] == 0
    assert costs[one(gm, aten.embedding.default).name] > 0
    with pytest.raises(ValueError):
        profile_costs(gm, "meta")


def test_profile_costs_falls_back_for_invalid_inputs():
    def f(a, b, p):  # integer division by zero inputs, and a multinomial of negative weights
        return torch.div(a, b, rounding_mode="floor"), torch.multinomial(p, 2), p * 2

    gm = trace(f, torch.randint(1, 5, (100,)), torch.randint(1, 5, (100,)), torch.rand(3, 5))
    torch.manual_seed(0)  # random weights: negative ones (almost surely; surely with this seed)
    costs = profile_costs(gm, "cpu")
    div, multinomial = one(gm, aten.div.Tensor_mode), one(gm, aten.multinomial.default)
    assert costs.fallbacks == [div.name, multinomial.name]
    cpu = spec_for("cpu")
    assert costs[div.name] == node_time(div, cpu) > 0
    assert costs[multinomial.name] == node_time(multinomial, cpu) > 0
    assert costs[one(gm, aten.mul.Tensor).name] > 0 and costs.measured == 1


def test_profile_costs_long_graph_times_each_distinct_op_once():
    def f(x):
        for _ in range(250):
            x = torch.relu(x)
        return x

    gm = trace(f, torch.randn(32, 32))
    assert len(gm.graph.nodes) > 200  # the progress bar's branch
    costs = profile_costs(gm, "cpu", repeats=1)
    assert costs.measured == 1 and costs.reused == 249
    assert len({c for c in costs.values() if c > 0}) == 1


def test_random_ops_are_priced_by_the_numbers_they_generate():
    from fxmem.cost.model import compute_time

    gm = trace(lambda x: aten.native_dropout(x, 0.1, True)[0] * 2.0, torch.randn(2**20))
    dropout = next(n for n in gm.graph.nodes if n.target is aten.native_dropout.default)
    mul = next(n for n in gm.graph.nodes if n.target is aten.mul.Tensor)
    spec = cpu_spec()
    assert spec.random_per_s > 0
    generating = 2**20 / spec.random_per_s  # 5 ms at the default 2e8 numbers/s
    assert node_time(dropout, spec) == pytest.approx(generating + spec.op_overhead_s)
    assert compute_time(dropout, spec) == pytest.approx(generating)  # fused, it still generates
    assert node_time(mul, spec) < generating / 4  # a pointwise op of the same size: its bytes
    no_bound = DeviceSpec("no rng bound", {torch.float32: 5e10}, 1e10, 2e-6)
    assert node_time(dropout, no_bound) == pytest.approx(
        node_bytes(dropout) / 1e10 + 2e-6)  # without the bound: the roofline
