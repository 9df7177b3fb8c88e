"""The memory model of Inductor's lowering, and the pass that keeps a delayed addmm early."""

import dataclasses

import pytest
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from fxmem.memory.inductor import (
    Lowered,
    channels_last_copies,
    kernel_groups,
    lower_storages,
    lowering_kinds,
)
from fxmem.memory.simulation import StepStorages, simulate
from fxmem.passes.inductor_order import SplitDelayedAddmm

aten = torch.ops.aten


def traced(fn, *shapes):
    return make_fx(fn, tracing_mode="fake")(*[torch.randn(s) for s in shapes])


def kinds_by_name(gm):
    return lowering_kinds(gm, torch.device("cpu"))


def test_pointwise_chains_are_inlined_and_extern_inputs_realised():
    def f(x, w):
        a = x * 2.0  # read only by the add: inlined
        b = a + 1.0  # read by mm: realised
        c = b @ w  # extern
        return (c.relu() * 3.0).sum()  # relu inlined into the mul, the mul into the sum

    kinds = kinds_by_name(traced(f, (64, 64), (64, 64)))
    assert kinds == {"mul": Lowered.INLINED, "add": Lowered.KERNEL, "mm": Lowered.EXTERN,
                     "relu": Lowered.INLINED, "mul_1": Lowered.INLINED,
                     "sum_1": Lowered.REDUCTION}


def test_a_reused_exp_is_realised_on_cpu_like_inductor_does():
    def f(x):
        e = x.exp()
        return e.sum() + e.amax()

    assert kinds_by_name(traced(f, (32, 32)))["exp"] is Lowered.KERNEL


def test_graph_outputs_are_realised():
    def f(x):
        return x * 2.0, (x + 1.0).sum()

    kinds = kinds_by_name(traced(f, (8, 8)))
    assert kinds["mul"] is Lowered.KERNEL and kinds["add"] is Lowered.INLINED


def test_lowering_frees_inlined_values_and_extends_their_inputs_lives():
    # x (resident) -> a = op0(x) -> b = op1(a) -> c = op2(b); c is the output
    step = StepStorages(
        op_names=("a", "b", "c"), creates=((1,), (2,), (3,)), reads=((0,), (1,), (2,)),
        nbytes=(100, 100, 100, 100), category=("inputs",) + ("temporaries",) * 3,
        resident=frozenset({0}), pinned=frozenset({3}), accumulates={}, backward_start=3)
    eager = simulate(step)
    lowered = lower_storages(step, [Lowered.INLINED, Lowered.INLINED, Lowered.KERNEL])
    assert lowered.reads[2] == (0,)  # c's kernel reads x through the inlined a and b
    assert lowered.nbytes[1] == lowered.nbytes[2] == 0
    assert eager.peak == 300 and simulate(lowered).peak == 200


def test_a_kernel_takes_over_a_dying_input_of_its_size():
    step = StepStorages(
        op_names=("a", "b"), creates=((1,), (2,)), reads=((0,), (1,)),
        nbytes=(100, 100, 100), category=("inputs", "temporaries", "temporaries"),
        resident=frozenset({0}), pinned=frozenset({2}), accumulates={}, backward_start=2)
    assert simulate(step).peak == 300
    assert simulate(lower_storages(step, [Lowered.EXTERN, Lowered.KERNEL])).peak == 200


def delayed_addmm_graph():
    graph = torch.fx.Graph()
    g, h, e = (graph.placeholder(n) for n in ("g", "h", "e"))
    gt = graph.call_function(aten.t.default, (g,))
    early = graph.call_function(aten.mm.default, (g, e))  # the gradient w.r.t. the input
    late = graph.call_function(aten.mul.Tensor, (e, 2.0))
    fused = graph.call_function(aten.addmm.default, (late, gt, h))
    graph.output((early, fused))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode()
    FakeTensorProp(gm, mode).propagate(
        *[mode.from_tensor(torch.randn(s)) for s in ((512, 64), (512, 8), (64, 8))])
    return gm


def test_split_delayed_addmm_computes_the_product_early_and_keeps_the_result():
    gm = delayed_addmm_graph()
    args = (torch.randn(512, 64), torch.randn(512, 8), torch.randn(64, 8))
    expected = gm(*args)
    SplitDelayedAddmm()(gm.graph)
    gm.recompile()
    order = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.addmm.default not in order
    assert order.index(aten.mm.default) < order.index(aten.mul.Tensor)  # the product first
    assert order[-1] is aten.add.Tensor  # the sum where the addmm was
    got = gm(*args)
    for a, b in zip(got, expected):  # mm + add rounds like eager autograd, not like addmm
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_split_leaves_an_addmm_whose_bias_is_ready_first():
    graph = torch.fx.Graph()
    b, x, w = (graph.placeholder(n) for n in ("b", "x", "w"))
    graph.output(graph.call_function(aten.addmm.default, (b, x, w)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    SplitDelayedAddmm()(gm.graph)
    assert any(n.target is aten.addmm.default for n in gm.graph.nodes)


def _pooled_step(recipient: bool, key_c=("f32", 100)):
    # a (100 B) dies at op 1; op 2 makes c; x is resident. With pooling, c reuses a's buffer, so
    # a stays allocated from op 1 to op 2 and c costs nothing new.
    return StepStorages(
        op_names=("a", "b", "c", "d"), creates=((1,), (2,), (3,), (4,)),
        reads=((0,), (1,), (0,), (2, 3)), nbytes=(10, 100, 50, 100, 1),
        category=("inputs",) + ("temporaries",) * 4, resident=frozenset({0}),
        pinned=frozenset({4}), accumulates={}, backward_start=4,
        reuse_keys={1: ("f32", 100), 2: ("f32", 50), 3: key_c},
        pool_recipients=frozenset({3}) if recipient else frozenset())


def test_a_pooled_buffer_stays_allocated_until_its_reuse():
    plain = simulate(_pooled_step(recipient=False))
    pooled = simulate(_pooled_step(recipient=True))
    # without pooling a is freed after op b, and c allocates 100 new bytes at op c
    assert plain.total.tolist() == [110, 160, 160, 161]
    assert plain.allocated.tolist() == [100, 150, 250, 251]
    # with pooling a's 100 bytes are held from b to c, which takes them over: same peak here,
    # but nothing is allocated at c
    assert pooled.total.tolist() == [110, 160, 160, 161]
    assert pooled.allocated.tolist() == [100, 150, 150, 151]


def test_a_pooled_buffer_held_across_a_peak_raises_it():
    # a dies at op 1 and is reused at op 3; op 2 makes a large temporary in between
    step = StepStorages(
        op_names=("a", "b", "big", "c"), creates=((1,), (2,), (3,), (4,)),
        reads=((0,), (1,), (2,), (0,)), nbytes=(10, 100, 5, 1000, 100),
        category=("inputs",) + ("temporaries",) * 4, resident=frozenset({0}),
        pinned=frozenset({4}), accumulates={}, backward_start=4)
    free = simulate(step).peak
    pooled = simulate(dataclasses.replace(step, reuse_keys={1: "k", 4: "k"},
                                          pool_recipients=frozenset({4})))
    assert free == 10 + 5 + 1000
    assert pooled.peak == free + 100  # a's dead buffer waits for c through the big temporary


def _group_step(accumulates=None, **kw):
    # x (resident) -> a = k0(x) -> b = k1(a) -> c = k2(b), k0..k2 kernels of one group; c is kept
    return StepStorages(
        op_names=("a", "b", "c"), creates=((1,), (2,), (3,)), reads=((0,), (1,), (2,)),
        nbytes=(10, 100, 100, 100), category=("inputs",) + ("temporaries",) * 3,
        resident=frozenset({0}), pinned=frozenset({3}), accumulates=accumulates or {},
        backward_start=3, **kw)


def test_a_kernel_group_frees_what_dies_in_it_after_the_whole_group():
    # op by op, a dies at b and b at c: never more than two of the three live
    assert simulate(_group_step()).total.tolist() == [110, 210, 210]
    # one C++ function: a and b are freed only after c, so all three are live at c
    grouped = simulate(_group_step(release_after=(2, 2, 2)))
    assert grouped.total.tolist() == [110, 210, 310]
    # an in-place take-over still happens at its own op: c written into b, which dies there
    inplace = simulate(_group_step(release_after=(2, 2, 2), accumulates={3: (2,)}))
    assert inplace.total.tolist() == [110, 210, 210]
    with pytest.raises(ValueError, match="release_after"):
        _group_step(release_after=(0, 0, 2))  # freed before its own op


def test_kernel_groups_end_at_extern_kernels_and_at_the_end_of_the_forward():
    K, E, I = Lowered.KERNEL, Lowered.EXTERN, Lowered.INLINED
    #                     0  1  2  3  4  5  6  7
    groups = kernel_groups([K, I, E, K, K, K, E, K], backward_start=5)
    # ops 0-1 end where the extern op 2 starts; op 2 frees after itself; 3-4 end with the forward
    # (op 4); the backward's 5 ends before the extern 6; 7 ends the graph
    assert groups == (1, 1, 2, 4, 4, 5, 6, 7)


def test_pools_match_keys_and_do_not_cross_from_forward_to_backward():
    different_key = simulate(_pooled_step(recipient=True, key_c=("bf16", 100)))
    assert different_key.allocated.tolist() == [100, 150, 250, 251]  # no reuse across dtypes
    step = dataclasses.replace(_pooled_step(recipient=True), backward_start=2)
    assert simulate(step).allocated.tolist() == [100, 150, 250, 251]  # c is in the backward


def test_channels_last_copies_are_the_convolution_inputs_not_already_channels_last():
    def f(x, w3, w1):
        y = torch.nn.functional.conv2d(x, w3, padding=1)
        return torch.nn.functional.conv2d(y, w1).sum()

    gm = traced(f, (2, 4, 8, 8), (8, 4, 3, 3), (8, 8, 1, 1))
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    # the images and the 3x3 weight are copied; a 1x1 weight is channels-last already
    assert channels_last_copies(gm) == [names[0], names[1]]
    no_conv = traced(lambda x: (x * 2).sum(), (2, 4, 8, 8))
    assert channels_last_copies(no_conv) == []


def test_a_backward_input_is_freed_not_pooled():
    # forward: x_saved (op 0). backward: y made at op 1, y dies at op 2, x_saved dies at op 3,
    # r (same key) made at op 4. Inductor frees the saved x (a graph input of the backward) and
    # reuses y for r, holding y from op 2 to op 4.
    step = StepStorages(
        op_names=("x", "y", "use_y", "use_x", "r"), creates=((1,), (2,), (), (), (3,)),
        reads=((0,), (0,), (2,), (1,), (0,)), nbytes=(10, 100, 100, 100),
        category=("inputs", "saved activations", "temporaries", "gradients"),
        resident=frozenset({0}), pinned=frozenset({3}), accumulates={}, backward_start=1,
        reuse_keys={1: "k", 2: "k", 3: "k"}, pool_recipients=frozenset({3}))
    timeline = simulate(step)
    # at op 3 (use_x) y is dead but held for r while x is read: 10 + 100 + 100; at op 4 x is gone
    assert timeline.total.tolist() == [110, 210, 210, 210, 110]  # pooling x: 110 at op 3
    assert timeline.allocated.tolist() == [100, 200, 200, 200, 200]  # r took y's bytes


def test_channels_last_convolution_backward_needs_no_copies_of_its_activations():
    from fxmem.memory.storages import scratch_bytes

    def f(go, x, w):
        return aten.convolution_backward(go, x, w, [0], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                         [True, True, False])

    gm = traced(f, (4, 8, 16, 16), (4, 8, 16, 16), (8, 8, 3, 3))
    node = next(n for n in gm.graph.nodes if n.target is aten.convolution_backward.default)
    cpu = torch.device("cpu")
    activation, weight = 4 * 8 * 16 * 16 * 4, 8 * 8 * 9 * 4
    # oneDNN reorders a contiguous output gradient and input into its blocked layout; given
    # channels-last tensors (Inductor's layout optimisation) it reorders only the weight
    assert scratch_bytes(node, cpu) == 2 * activation
    assert scratch_bytes(node, cpu, channels_last=True) == 2 * weight
    assert scratch_bytes(node, torch.device("meta"), channels_last=True) == 0


class _Part:  # the parts of an Inductor scheduler node that KeepRecomputedInPlace looks at
    def __init__(self, order, *origins):
        self.node = type("IRNode", (), {"origins": set(origins)})()
        self.min_order = self.max_order = order

    def get_nodes(self):
        return [self]


def test_recomputed_ops_are_not_fused_horizontally_from_afar(monkeypatch):
    from torch._inductor.choices import InductorChoices

    from fxmem.passes.inductor_order import NEAR, KeepRecomputedInPlace
    from fxmem.passes.recompute import RECOMPUTED

    gm = traced(lambda x: (x.relu() * 2).sum(), (4, 4))
    relu, mul = [n for n in gm.graph.nodes if n.op == "call_function"][:2]
    relu.meta[RECOMPUTED] = True
    asked = []
    monkeypatch.setattr(InductorChoices, "can_fuse_horizontal",
                        staticmethod(lambda *args: asked.append(args) or True))
    choices = KeepRecomputedInPlace()
    far = NEAR + 1
    assert not choices.can_fuse_horizontal(None, _Part(0, relu), _Part(far, mul), 100)
    assert not choices.can_fuse_horizontal(None, _Part(0, mul), _Part(far, mul, relu), 100)
    assert asked == []  # refused before Inductor's own heuristics are asked
    assert choices.can_fuse_horizontal(None, _Part(0, mul), _Part(far, mul), 100)
    assert choices.can_fuse_horizontal(None, _Part(0, mul), _Part(1, relu), 100)  # next door
    assert len(asked) == 2
    assert choices.uuid() == KeepRecomputedInPlace().uuid()


def test_values_after_the_last_convolution_that_feed_none_stay_contiguous():
    from fxmem.memory.inductor import contiguous_values

    def f(x, w1, w2):
        a = torch.nn.functional.conv2d(x, w1, padding=1).relu()  # feeds a convolution
        b = torch.nn.functional.conv2d(a, w2, padding=1)
        return b.relu().mean((2, 3)).sum()  # after the last convolution, read by the pooling

    gm = traced(f, (2, 3, 8, 8), (4, 3, 3, 3), (4, 4, 3, 3))
    assert contiguous_values(gm) == {"relu_1"}


def test_unexpanded_inlined_values_are_read_as_themselves_from_the_given_op_on():
    # x (resident) -> a = inlined(x) -> f = kernel(a) in the forward; the backward's g reads a
    step = StepStorages(
        op_names=("a", "f", "g"), creates=((1,), (2,), (3,)), reads=((0,), (1,), (1,)),
        nbytes=(100, 100, 100, 100), category=("inputs",) + ("temporaries",) * 3,
        resident=frozenset({0}), pinned=frozenset({3}), accumulates={}, backward_start=2)
    kinds = [Lowered.INLINED, Lowered.KERNEL, Lowered.KERNEL]
    assert lower_storages(step, kinds).reads[2] == (0,)
    lowered = lower_storages(step, kinds, unexpanded=frozenset({1}), from_op=2)
    assert lowered.reads[1] == (0,) and lowered.reads[2] == (1,)
    assert lowered.creates[0] == (1,) and lowered.nbytes[1] == 0  # made, but free, by its op
