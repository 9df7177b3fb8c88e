"""The memory model on small hand-built graphs whose answers are worked out by hand.

Each graph is written node by node with ``torch.fx.Graph``, its tensors propagated as fake
tensors, and its roles (parameter, input, forward/backward) assigned by hand. Sizes: a float32
vector of 1024 elements is 4096 bytes ("K" below); a scalar is 4 bytes.
"""

import pytest
import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch._subclasses.fake_tensor import FakeTensorMode

from fxmem.graph.capture import CapturedStep, Role
from fxmem.memory.simulation import StepStorages, simulate
from fxmem.memory.storages import allocation_bytes, step_storages

aten = torch.ops.aten
K = 4096  # bytes of a float32 [1024]


class G:
    """A tiny builder: placeholders with roles, ops in forward or backward, outputs."""

    def __init__(self):
        self.graph = torch.fx.Graph()
        self.roles, self.backward, self.examples = {}, set(), []
        self.params, self.grads = {}, {}

    def param(self, name, shape=(1024,)):
        node = self.graph.placeholder(name)
        self.roles[node.name], self.params[node.name] = Role.PARAMETER, name
        self.examples.append(torch.randn(shape))
        return node

    def input(self, name, shape=(1024,)):
        node = self.graph.placeholder(name)
        self.roles[node.name] = Role.INPUT
        self.examples.append(torch.randn(shape))
        return node

    def op(self, target, *args, backward=False):
        node = self.graph.call_function(target, args)
        self.roles[node.name] = Role.GRADIENT if backward else Role.ACTIVATION
        if backward:
            self.backward.add(node.name)
        return node

    def item(self, node, i):
        import operator

        out = self.graph.call_function(operator.getitem, (node, i))
        self.roles[out.name] = self.roles[node.name]
        if node.name in self.backward:
            self.backward.add(out.name)
        return out

    def build(self, loss, grads=(), held=()):
        self.graph.output([loss, *held, *(g for g, _ in grads)])
        gm = torch.fx.GraphModule(torch.nn.Module(), self.graph)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            FakeTensorProp(gm, mode).propagate(*self.examples)
        self.roles[loss.name] = Role.LOSS
        return CapturedStep(
            gm=gm, roles=self.roles, backward_nodes=frozenset(self.backward),
            param_names=self.params, buffer_names={},
            input_names={n: n for n, r in self.roles.items() if r is Role.INPUT},
            loss_node=loss.name, held_outputs=[h.name for h in held],
            grad_of={g.name: p for g, p in grads}, device=torch.device("cpu"),
        )


def timeline_of(step):
    return simulate(step_storages(step))


def test_value_used_only_by_backward_is_held_until_its_use():
    g = G()
    w, x = g.param("w"), g.input("x")
    a = g.op(aten.mul.Tensor, x, w)
    b = g.op(aten.relu.default, a)  # relu's output is what its backward reads
    loss = g.op(aten.sum.default, b)
    one = g.op(aten.ones_like.default, loss, backward=True)
    ge = g.op(aten.expand.default, one, [1024], backward=True)
    gb = g.op(aten.threshold_backward.default, ge, b, 0.0, backward=True)
    gw = g.op(aten.mul.Tensor, gb, x, backward=True)
    step = g.build(loss, grads=[(gw, "w")])
    tl = timeline_of(step)
    # resident 2K; mul +K (3K); relu +K then frees a (4K at the op); sum +4; ones +4;
    # threshold_backward +K: w, x, b, gb, loss, one -> 4K + 8 bytes; then b and one freed.
    assert tl.peak == 4 * K + 8
    assert tl.peak_label == gb.name
    assert tl.breakdown() == {
        "parameters": K, "buffers": 0, "gradients": 0, "optimizer state": 0, "inputs": K,
        "saved activations": K, "outputs": 4, "temporaries": K + 4, "communication buffers": 0,
    }
    storages = step_storages(step)
    b_storage = storages.creates[storages.op_names.index(b.name)][0]
    a_storage = storages.creates[storages.op_names.index(a.name)][0]
    assert storages.category[b_storage] == "saved activations"
    assert storages.category[a_storage] == "temporaries"
    assert storages.backward_start == storages.op_names.index(one.name)


def test_views_allocate_nothing_and_keep_their_base_alive():
    g = G()
    w, x = g.param("w"), g.input("x")
    a = g.op(aten.mul.Tensor, x, w)
    v = g.op(aten.view.default, a, [32, 32])
    t = g.op(aten.t.default, v)  # a view of a view: `a` stays alive through `t`
    big = g.op(aten.mul.Tensor, x, x)
    bigv = g.op(aten.view.default, big, [32, 32])
    c = g.op(aten.add.Tensor, bigv, t)
    loss = g.op(aten.sum.default, c)
    step = g.build(loss)
    storages = step_storages(step)
    for node in (v, t, bigv):
        assert storages.creates[storages.op_names.index(node.name)] == ()
    tl = timeline_of(step)
    # resident 2K; a: 3K; views: 3K; big: 4K; at the add: w, x, a, big, c -> 5K;
    # then a and big are freed: the sum runs with w, x, c and the loss -> 3K + 4.
    assert tl.peak == 5 * K and tl.peak_label == c.name
    assert tl.live[tl.labels.index(loss.name)].sum() == 3 * K + 4


def test_in_place_ops_allocate_nothing():
    g = G()
    w, x = g.param("w"), g.input("x")
    a = g.op(aten.mul.Tensor, x, w)
    a2 = g.op(aten.relu_.default, a)
    a3 = g.op(aten.mul_.Tensor, a2, 2.0)
    loss = g.op(aten.sum.default, a3)
    step = g.build(loss)
    storages = step_storages(step)
    assert storages.creates[storages.op_names.index(a2.name)] == ()
    assert storages.creates[storages.op_names.index(a3.name)] == ()
    tl = timeline_of(step)
    assert tl.peak == 3 * K + 4  # w, x, a (mutated twice, never copied) and the loss
    assert tl.peak_label == loss.name


def test_multi_output_op_allocates_every_output_and_frees_the_unused_ones():
    g = G()
    w, x = g.param("w", (4, 256)), g.input("x", (4, 256))
    a = g.op(aten.mul.Tensor, x, w)
    ln = g.op(aten.native_layer_norm.default, a, [256], None, None, 1e-5)
    out = g.item(ln, 0)  # mean and rstd ([4, 1] each, 16 bytes) are never read
    loss = g.op(aten.sum.default, out)
    step = g.build(loss)
    storages = step_storages(step)
    created = storages.creates[storages.op_names.index(ln.name)]
    assert sorted(storages.nbytes[s] for s in created) == [16, 16, K]
    tl = timeline_of(step)
    assert tl.peak == 4 * K + 32  # w, x, a, out, mean, rstd while layer_norm runs
    assert tl.peak_label == ln.name
    assert tl.live[tl.labels.index(loss.name)].sum() == 3 * K + 4  # a, mean, rstd freed


def test_gradient_accumulated_from_two_uses_is_summed_in_place():
    g = G()
    w, x = g.param("w"), g.input("x")
    a = g.op(aten.mul.Tensor, x, w)  # first use of w
    b = g.op(aten.mul.Tensor, a, w)  # second use of w
    loss = g.op(aten.sum.default, b)
    one = g.op(aten.ones_like.default, loss, backward=True)
    ge = g.op(aten.expand.default, one, [1024], backward=True)
    gw2 = g.op(aten.mul.Tensor, ge, a, backward=True)  # d loss / d w through b
    ga = g.op(aten.mul.Tensor, ge, w, backward=True)
    gw1 = g.op(aten.mul.Tensor, ga, x, backward=True)  # d loss / d w through a
    gw = g.op(aten.add.Tensor, gw1, gw2, backward=True)  # autograd accumulates the two
    step = g.build(loss, grads=[(gw, "w")])
    tl = timeline_of(step)
    i = tl.labels.index(gw.name)
    # at the add: w, x, gw1 and gw2 -> 4K; the sum reuses gw1's storage, so no fifth K
    assert tl.live[i].sum() == 4 * K + 4  # + the loss scalar (held)
    assert tl.breakdown(i)["gradients"] == K and tl.breakdown(i)["temporaries"] == K
    # a is freed after gw2 (its only backward use); the peak is at gw1: w, x, gw2, ga and gw1
    # (5K) + the loss; `one` was freed after ga, its last reader.
    assert tl.peak == 5 * K + 4
    assert tl.peak_label == gw1.name


def test_simulate_on_plain_data_with_constant_and_epilogue():
    step = StepStorages(
        op_names=("f", "g", "h"),
        creates=((1,), (2,), (3,)),
        reads=((0,), (1,), (1, 2)),
        nbytes=(100, 10, 20, 5),
        category=("parameters", "saved activations", "temporaries", "gradients"),
        resident=frozenset({0}),
        pinned=frozenset({3}),
        accumulates={},
        backward_start=2,
    )
    tl = simulate(step, constant={"optimizer state": 200}, epilogue=[("opt", {"temporaries": 50})])
    assert list(tl.total) == [310, 330, 335, 355]
    assert tl.peak == 355 and tl.peak_label == "opt"
    assert tl.backward_start == 2
    with pytest.raises(ValueError, match="permutation"):
        simulate(step, order=[0, 0, 1])


def test_cuda_allocator_rounding():
    assert allocation_bytes(1, torch.device("cuda")) == 512
    assert allocation_bytes(513, torch.device("cuda")) == 1024
    assert allocation_bytes(0, torch.device("cuda")) == 0
    assert allocation_bytes(513, torch.device("cpu")) == 513
