"""Compute casts: the step captured under ``torch.autocast``, so the joint graph holds the casts.

The precision lever does not rewrite a captured graph: it captures the step (model and loss)
under ``torch.autocast(device_type, dtype=dtype)``, ``dtype`` bf16 or fp16. TorchDynamo records
the autocast region, and AOTAutograd's joint graph then holds the casts as ATen ``_to_copy`` nodes
with the backward autograd derives from them:

- the ops on autocast's lower-precision list for the device (matrix products, convolutions,
  attention: :data:`LOW_PRECISION_OPS` at the ATen level) read bf16 (or fp16) copies of their
  inputs, the parameters staying fp32 master weights (their low copies are temporaries of the
  graph, which the memory model counts at 2 bytes an element);
- the ops on autocast's fp32 list (the losses, among others) run in fp32; the others run in the
  dtype of their inputs, as autocast leaves them. On the CPU, autocast's fp32 list holds the
  losses but not softmax or the norms, whose CPU kernels accumulate in fp32 on bf16 inputs; in a
  transformer the norms read the fp32 residual stream (bf16 + fp32 promotes to fp32);
- attention with dropout on the CPU, which PyTorch runs in fp32 (its fused CPU kernel takes no
  dropout), runs its products and probabilities in the low dtype
  (:mod:`fxmem.levers.precision.attention`);
- the gradients of the parameters are fp32 (the backward of a cast casts back).

The loss is returned in fp32; other outputs the caller holds (a model's logits) keep the dtype
autocast gave them, as in a user's own autocast loop. Inductor fuses the casts into its kernels.

fp16 has bf16's casts (autocast's op lists are the same for both) but 5 bits of exponent: its
backward needs loss scaling, which ``fxmem.optimize`` runs around the step
(:mod:`fxmem.levers.precision.loss_scale`). Whether autocast casts to ``dtype`` on the device is
checked when the casts are made (torch.autocast itself only warns and runs in fp32): CPU autocast
takes fp16 on torch 2.13.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx

from fxmem.graph.ops import base_name
from fxmem.levers.precision.attention import LowPrecisionAttention

__all__ = ["ComputeCasts", "casts_for", "casting", "run_with_casts", "LOW_PRECISION_OPS",
           "is_compute_op", "SUPPORTED_DTYPES"]

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)

# ATen ops (as AOTAutograd's joint graph holds them) of torch.autocast's lower-precision list:
# matrix products, convolutions and attention, their backward ops included
LOW_PRECISION_OPS = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "convolution", "convolution_backward",
    "_convolution", "linear", "matmul",
})
_ATTENTION_PREFIX = "_scaled_dot_product_"  # every SDPA kernel and its backward


def is_compute_op(node: torch.fx.Node) -> bool:
    """The node runs a matrix product, a convolution or attention (autocast's lower-precision
    list at the ATen level)."""
    if node.op != "call_function":
        return False
    name = base_name(node.target)
    return name in LOW_PRECISION_OPS or name.startswith(_ATTENTION_PREFIX)


@dataclasses.dataclass(frozen=True)
class ComputeCasts:
    """Run the step's matrix products, convolutions and attention in ``dtype`` on
    ``device_type`` (autocast's op lists). ``reason``: why the plan uses it (for the report)."""

    device_type: str
    dtype: torch.dtype = torch.bfloat16
    reason: str = ""

    def __post_init__(self):
        if not isinstance(self.device_type, str) or not self.device_type:
            raise TypeError(f"device_type must be a device type such as 'cpu' or 'cuda', got "
                            f"{self.device_type!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"compute casts run in one of {[str(d) for d in SUPPORTED_DTYPES]}, "
                             f"got {self.dtype}")
        try:
            available = torch.amp.is_autocast_available(self.device_type)
        except RuntimeError as exc:  # not a device type at all
            raise ValueError(f"{self.device_type!r} is not a device type: {exc}") from None
        if not available:
            raise ValueError(f"torch.autocast is not available on {self.device_type!r}: the "
                             "precision lever cannot cast this step's compute")
        if not _autocasts_to(self.device_type, self.dtype):
            raise ValueError(f"torch.autocast on {self.device_type!r} does not run in "
                             f"{self.dtype_name} here (torch {torch.__version__}; or no such "
                             "device is present): the precision lever cannot cast this step's "
                             "compute to it")

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _autocasts_to(device_type: str, dtype: torch.dtype) -> bool:
    """torch.autocast(device_type, dtype) is enabled in ``dtype`` (it warns and turns itself off
    where the device does not take the dtype, or is not there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type, dtype=dtype):
            return (torch.is_autocast_enabled(device_type)
                    and torch.get_autocast_dtype(device_type) == dtype)


def casts_for(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
              reason: str = "") -> ComputeCasts:
    """The compute casts for a step on ``device``."""
    return ComputeCasts(torch.device(device).type, dtype, reason)


@contextlib.contextmanager
def casting(casts: ComputeCasts | None) -> Iterator[None]:
    """``torch.autocast`` for ``casts`` (with :class:`LowPrecisionAttention`); nothing when
    ``casts`` is None."""
    if casts is None:
        yield
        return
    with torch.autocast(casts.device_type, dtype=casts.dtype), LowPrecisionAttention(casts.dtype):
        yield


def run_with_casts(casts: ComputeCasts, fn: Callable[[Sequence[Any]], tuple[torch.Tensor, ...]],
                   tensors: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """``fn(tensors) -> (loss, *held outputs)`` under autocast, the loss returned in fp32 (traced
    by TorchDynamo inside the step: the autocast region becomes cast nodes of the joint graph)."""
    with casting(casts):
        loss, *held = fn(tensors)
    if loss.dtype in (torch.bfloat16, torch.float16):
        loss = loss.float()
    return (loss, *held)
