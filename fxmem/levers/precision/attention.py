"""Attention with dropout in low precision on the CPU, where PyTorch's own path runs it in fp32.

Under ``torch.autocast`` attention (``scaled_dot_product_attention``) is on the lower-precision
list, and on a GPU its fused kernels (flash, memory-efficient) run it in bf16/fp16 with dropout.
The CPU's fused kernel takes no dropout, so a training step's attention with ``dropout_p > 0``
falls back to PyTorch's math path, which upcasts bf16 query, key and value to fp32 for accuracy:
the scores, the probabilities, the dropout noise and the dropped probabilities -- each
``batch x heads x seq x seq`` -- are then fp32, and one layer's of them hold the step's peak
(on the bench GPT decoder, 16 MiB each).

:class:`LowPrecisionAttention` is a ``TorchFunctionMode`` that TorchDynamo traces through: while the
precision lever captures the step, such an attention call runs as what a GPU's flash kernel
computes -- the products ``q k^T`` and ``p v`` in the low dtype (fp32 accumulation inside the
matrix product), the scale, the mask and the softmax in fp32, the probabilities rounded to the
low dtype before dropout and ``p v`` -- as ordinary ops, so the joint graph holds them, Inductor
fuses the softmax with its casts, and the memory model counts 2 bytes an element. The scores are
rounded to the low dtype once (the output of ``q k^T``), which a flash kernel does not do; the
accuracy bench (``bench/accuracy.py``) measures the LM trained this way.

Attention without dropout, or not on the CPU, is left to PyTorch (its fused kernels are already
low precision there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["LowPrecisionAttention", "SoftmaxToLow", "low_precision_attention", "takes_over"]


def takes_over(query: torch.Tensor, dropout_p: float) -> bool:
    """The mode computes this attention call itself: dropout on a CPU tensor."""
    return query.device.type == "cpu" and float(dropout_p) > 0.0


def low_precision_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                            is_causal: bool = False, scale: float | None = None,
                            enable_gqa: bool = False, *, dtype: torch.dtype) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with its products in ``dtype`` and its softmax in
    fp32, the probabilities in ``dtype`` before dropout (a flash kernel's numerics, the scores
    rounded once to ``dtype``)."""
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: attn_mask and is_causal=True together "
                         "(PyTorch refuses this too)")
    q, k, v = (t.to(dtype) for t in (query, key, value))
    if enable_gqa and k.size(-3) != q.size(-3):
        groups = q.size(-3) // k.size(-3)
        k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * scale
    if is_causal:
        keep = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
    elif attn_mask is not None:
        scores = (scores.masked_fill(attn_mask.logical_not(), float("-inf"))
                  if attn_mask.dtype == torch.bool else scores + attn_mask)
    probs = SoftmaxToLow.apply(scores, dtype)
    probs = F.dropout(probs, p=float(dropout_p), training=True)
    return torch.matmul(probs, v)


class SoftmaxToLow(torch.autograd.Function):
    """``softmax(scores).to(dtype)`` over the last dim, computed in fp32, saving only the
    ``dtype`` probabilities for its backward (not the fp32 ones): the backward
    ``p * (g - sum(g * p))`` runs in fp32 from them, one fused kernel under Inductor."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        probs = torch.softmax(scores.float(), dim=-1).to(dtype)
        ctx.save_for_backward(probs)
        ctx.scores_dtype = scores.dtype
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (probs,) = ctx.saved_tensors
        p, g = probs.float(), grad.float()
        return (p * (g - (g * p).sum(-1, keepdim=True))).to(ctx.scores_dtype), None


class LowPrecisionAttention(TorchFunctionMode):
    """While active (inside the precision lever's autocast region), attention with dropout on
    the CPU runs :func:`low_precision_attention` in ``dtype``; every other call is PyTorch's."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = _bind(*args, **kwargs)
            if takes_over(bound["query"], bound["dropout_p"]):
                return low_precision_attention(**bound, dtype=self.dtype)
        return func(*args, **kwargs)


def _bind(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False) -> dict:
    return dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
