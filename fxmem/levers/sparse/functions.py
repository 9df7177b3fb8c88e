"""The transient-dense products of the sparse layers, as autograd functions that do not keep the
dense weight.

``F.linear(x, densify(values))`` would save the dense weight for the backward (the input's
gradient needs it), so after the forward every sparse layer's dense weight would be alive at once.
These functions save only the input, the values and the indices; the backward materialises the
dense weight again (one layer at a time), and the gradient of the values is the dense weight's
gradient read at the indices (``index_select``, which takes the int32 indices as they are):

    forward:  W = zeros(numel).index_add_(0, indices, values).view(shape);  y = x W^T + b
    backward: W again;  dx = dy W;  dvalues = (dy^T x).flatten()[indices];  db = sum(dy)

Both are plain ATen ops, so ``make_fx``, TorchDynamo and AOTAutograd trace them, and fxmem's
memory model counts the transient weight and the transient dense gradient where they are.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

__all__ = ["densify", "sparse_linear", "sparse_conv2d"]

log = logging.getLogger(__name__)


def densify(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense tensor of ``shape`` with ``values`` at the flat ``indices`` (int32), zeros
    elsewhere."""
    numel = 1
    for s in shape:
        numel *= s
    return values.new_zeros(numel).index_add_(0, indices, values).view(shape)


def _values_grad(dense_grad: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return dense_grad.reshape(-1).index_select(0, indices)


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, indices, bias, shape):
        w = densify(values, indices, shape)
        ctx.save_for_backward(x, values, indices)
        ctx.shape, ctx.has_bias = shape, bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        x, values, indices = ctx.saved_tensors
        out_features, in_features = ctx.shape
        g2 = grad.reshape(-1, out_features)
        # in the gradient's dtype: under bf16 casts the forward's product (and so grad) is bf16,
        # x may not be. type_as, not .to(g2.dtype): TorchDynamo bakes a dtype read in Python into
        # the graph, and the backend's graphs are traced in fp32, then run under autocast
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ densify(values, indices, ctx.shape).type_as(g2)).view(
                *grad.shape[:-1], in_features).type_as(x)
        if ctx.needs_input_grad[1]:
            gv = _values_grad(g2.t() @ x.reshape(-1, in_features).type_as(g2),
                              indices).type_as(values)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = g2.sum(0).type_as(values)
        return gx, gv, None, gb, None


class _SparseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, indices, bias, shape, stride, padding, dilation, groups):
        w = densify(values, indices, shape)
        ctx.save_for_backward(x, values, indices)
        ctx.conv = (shape, stride, padding, dilation, groups, bias is not None)
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, values, indices = ctx.saved_tensors
        shape, stride, padding, dilation, groups, has_bias = ctx.conv
        need = ctx.needs_input_grad
        mask = [need[0], need[1], has_bias and need[3]]
        # in the gradient's dtype, as the linear's backward: under bf16 casts the forward's
        # convolution (and so grad) is bf16 while x and the dense weight may be fp32; left mixed,
        # Inductor ran this backward on fp32 copies of its operands (WRN-28-2, bf16 + density
        # 0.05: 2.4 MB per 8 images more than the memory model's bf16 convolution); type_as as
        # in the linear's backward
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x.type_as(grad), densify(values, indices, shape).type_as(grad),
            [shape[0]] if has_bias else None,
            list(stride), list(padding), list(dilation), False, [0, 0], groups, mask)
        gx = gx.type_as(x) if need[0] else None
        gv = _values_grad(gw, indices).type_as(values) if need[1] else None
        gb = gb.type_as(values) if mask[2] else None
        return gx, gv, None, gb, None, None, None, None, None


def sparse_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  bias: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """``F.linear`` with the weight of ``shape`` given by ``values`` at the flat ``indices``."""
    return _SparseLinear.apply(x, values, indices, bias, tuple(shape))


def sparse_conv2d(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  bias: torch.Tensor | None, shape: tuple[int, ...], stride, padding, dilation,
                  groups: int) -> torch.Tensor:
    """``F.conv2d`` (zero padding) with the weight of ``shape`` given by ``values`` at
    ``indices``."""
    return _SparseConv2d.apply(x, values, indices, bias, tuple(shape), tuple(stride),
                               tuple(padding), tuple(dilation), groups)
