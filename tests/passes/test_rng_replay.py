"""The RNG-replay pass and the one predicate for "this op draws random numbers"."""

import pytest
import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxmem.passes.rng_replay import is_random, replay_random_ops

aten = torch.ops.aten


def _node(target, args, kwargs=None):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    args = tuple(x if a == "x" else a for a in args)
    kwargs = {k: x if v == "x" else v for k, v in (kwargs or {}).items()}
    return graph.call_function(target, args, kwargs)


@pytest.mark.parametrize("target, args, kwargs, random", [
    (aten.native_dropout.default, ("x", 0.1, True), {}, True),
    (aten.native_dropout.default, ("x", 0.0, True), {}, False),  # p = 0 draws nothing
    (aten.native_dropout.default, ("x", 0.1, False), {}, False),  # eval mode
    (aten.bernoulli_.float, ("x", 0.5), {}, True),
    (aten.rand_like.default, ("x",), {}, True),
    (aten.randn.default, ([2, 3],), {}, True),
    # attention kernels are tagged nondeterministic_seeded for their dropout, default 0
    (aten._scaled_dot_product_flash_attention_for_cpu.default, ("x", "x", "x"),
     {"attn_mask": "x"}, False),
    (aten._scaled_dot_product_flash_attention_for_cpu.default, ("x", "x", "x", 0.0, True),
     {}, False),
    (aten._scaled_dot_product_efficient_attention.default, ("x", "x", "x", None, True, 0.1),
     {}, True),
    (aten._scaled_dot_product_efficient_attention.default, ("x", "x", "x", None, True),
     {"dropout_p": 0.0}, False),
    (aten.add.Tensor, ("x", "x"), {}, False),
])
def test_random_means_draws_random_numbers(target, args, kwargs, random):
    node = _node(target, args, kwargs)
    assert torch.Tag.nondeterministic_seeded in target.tags or not random
    assert is_random(node) is random


def _graph(build, example):
    """A GraphModule from ``build(graph, *placeholders)``, its values fake-propagated."""
    graph = torch.fx.Graph()
    placeholders = [graph.placeholder(name) for name in example]
    graph.output(build(graph, *placeholders))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(t) for t in example.values()])
    return gm


def test_replay_passes_tensor_keyword_arguments_of_the_graph_it_runs_in():
    """A recomputed random op whose tensor argument is a keyword (as SDPA's ``attn_mask``) is
    replayed with the values of the graph it runs in, and draws the forward's numbers."""
    x, p = torch.randn(64), torch.rand(64)

    def forward(graph, x, p):
        mask = graph.call_function(aten.bernoulli.Tensor, (x,), {"p": p})
        mask.name = "mask"
        return (graph.call_function(aten.mul.Tensor, (mask, x)), x, p)

    def backward(graph, x, p, tangents_1):
        mask = graph.call_function(aten.bernoulli.Tensor, (x,), {"p": p})
        mask.name = "mask"
        return (graph.call_function(aten.mul.Tensor, (tangents_1, mask)),)

    fw = _graph(forward, {"x": x, "p": p})
    bw = _graph(backward, {"x": x, "p": p, "tangents_1": torch.ones(64)})
    record = replay_random_ops(fw, bw, num_fwd_outputs=1)
    assert record.replayed == ("mask",)
    torch.manual_seed(0)
    out, *saved = fw(x, p)
    after_forward = torch.random.get_rng_state()
    (grad,) = bw(*saved, torch.ones(64))
    assert torch.equal(torch.random.get_rng_state(), after_forward)  # the backward draws nothing
    torch.manual_seed(0)
    expected = aten.bernoulli.Tensor(x, p=p)
    torch.testing.assert_close(out, expected * x)
    torch.testing.assert_close(grad, expected)


class MaskedAttention(torch.nn.Module):
    """Attention blocks with a tensor mask, as Hugging Face models call it (``attn_mask=``)."""

    def __init__(self, width=32, heads=4, layers=4):
        super().__init__()
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(width, 3 * width) for _ in range(layers))
        self.heads = heads

    def forward(self, x, mask):
        b, t, c = x.shape
        for qkv in self.qkv:
            q, k, v = qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + a.transpose(1, 2).reshape(b, t, c).tanh()
        return x.square().mean()


def test_attention_with_a_mask_is_recomputed_exactly():
    """SDPA with dropout_p 0 is a plain op: recomputed, not replayed, its mask read in the
    backward (planning used to crash replaying it with the mask as an FX node)."""
    import fxmem
    from tests.helpers import EAGER_RECOMPUTE, assert_same_grads, grads_of

    torch.manual_seed(0)
    model = MaskedAttention()
    x = torch.randn(4, 64, 32)
    mask = torch.ones(64, 64, dtype=torch.bool).tril().expand(4, 1, 64, 64)
    expected = grads_of(model, model, x, mask)
    with pytest.raises(fxmem.BudgetError) as info:
        fxmem.optimize(model, 1, time_limit=5, **EAGER_RECOMPUTE)(x, mask)
    om = fxmem.optimize(model, int(1.05 * info.value.floor), time_limit=5, **EAGER_RECOMPUTE)
    assert_same_grads(expected, grads_of(model, om, x, mask))
    joint = {n.name: n for n in om.plan.graphs["joint"].graph.nodes}
    recomputed = [str(joint[r].target) for r in om.plan.record.recomputed if r in joint]
    assert any("scaled_dot_product" in r for r in recomputed), recomputed
    assert not om.plan.record.replayed
