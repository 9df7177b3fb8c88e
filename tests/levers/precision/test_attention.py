"""Attention with dropout on the CPU runs in bf16 under the precision lever.

PyTorch's fused CPU attention takes no dropout, so a training step's attention falls back to the
math path, which upcasts bf16 query, key and value to fp32; the lever computes such a call as a
GPU's flash kernel does (products in bf16, softmax in fp32, bf16 probabilities), checked here on
the planned joint graph of a tiny GPT, against fp32 numerics, and left to PyTorch without
dropout."""

import pytest
import torch
import torch.nn.functional as F

import fxmem
from fxmem.graph.ops import base_name
from fxmem.levers.precision.attention import LowPrecisionAttention, low_precision_attention
from tests.helpers import make_tiny_gpt

BF16 = torch.bfloat16


def _joint(dropout: float, train: bool = True):
    model, args, _ = make_tiny_gpt(dropout=dropout)
    model.train(train)
    plan = fxmem.optimize(model, 1 << 40, allow=("recompute", "precision"), precision="bf16",
                          lowering="eager").plan_for(*args)
    return plan.graphs["joint"]


def _dtypes(node):
    return [a.meta["val"].dtype for a in node.all_input_nodes]


def test_attention_with_dropout_runs_its_products_in_bf16():
    joint = _joint(dropout=0.1)
    bmms = [n for n in joint.graph.nodes if n.op == "call_function"
            and base_name(n.target) == "bmm"]
    assert bmms, "the tiny GPT's attention has batched products"
    assert all(d == BF16 for n in bmms for d in _dtypes(n)), \
        [(n.name, _dtypes(n)) for n in bmms if set(_dtypes(n)) != {BF16}]
    dropouts = [n for n in joint.graph.nodes if n.op == "call_function"
                and base_name(n.target) == "native_dropout"
                and n.args[0].meta["val"].dim() == 4]  # attention's, on (b, h, s, s)
    assert dropouts and all(_dtypes(n) == [BF16] for n in dropouts)


def test_attention_without_dropout_is_left_to_pytorch():
    joint = _joint(dropout=0.0)
    names = {base_name(n.target) for n in joint.graph.nodes if n.op == "call_function"}
    assert any(name.startswith("_scaled_dot_product_flash_attention") for name in names), names


@pytest.mark.parametrize("case", ["causal", "bool-mask", "float-mask", "gqa"])
def test_low_precision_attention_matches_fp32_within_bf16_tolerance(case):
    torch.manual_seed(0)
    b, h, s, e = 2, 4, 32, 16
    q = torch.randn(b, h, s, e, requires_grad=True)
    kv_heads = 2 if case == "gqa" else h
    k = torch.randn(b, kv_heads, s, e, requires_grad=True)
    v = torch.randn(b, kv_heads, s, e, requires_grad=True)
    kw = {"causal": dict(is_causal=True),
          "bool-mask": dict(attn_mask=torch.rand(s, s) > 0.3),
          "float-mask": dict(attn_mask=torch.randn(s, s)),
          "gqa": dict(enable_gqa=True, is_causal=True)}[case]
    expected = F.scaled_dot_product_attention(q, k, v, **kw)
    got = low_precision_attention(q, k, v, dropout_p=0.0, dtype=BF16, **kw)
    assert got.dtype == BF16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)
    g = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (q, k, v), g)
    have = torch.autograd.grad(got.float(), (q, k, v), g)
    for w, h_ in zip(want, have):
        torch.testing.assert_close(h_, w, atol=5e-2, rtol=5e-2)


def test_the_mode_takes_dropout_on_the_cpu_only():
    q = torch.randn(1, 2, 8, 4)
    with LowPrecisionAttention(BF16):
        assert F.scaled_dot_product_attention(q, q, q).dtype == torch.float32  # PyTorch's
        assert F.scaled_dot_product_attention(q, q, q, dropout_p=0.5).dtype == BF16
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        low_precision_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool),
                                is_causal=True, dtype=BF16)
