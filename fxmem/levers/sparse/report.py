"""What sparsification holds: per layer, its density and the bytes of parameters, gradients and
optimizer state, dense against sparse.

The bytes are counted from the tensors' sizes, as the memory model counts them: a dense layer
holds its weight and bias, their gradients and ``s`` optimizer state tensors of each (``s`` = 2
for Adam/AdamW, 3 with ``amsgrad``, 1 for SGD with momentum, 0 without an optimizer); a sparse
layer holds its values, their gradient and state, its int32 ``indices`` (and, with the CSR
kernel, the ``crow``/``col`` buffers), and the same dense bias.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from fxmem.budget import format_bytes
from fxmem.levers.sparse.layers import SparseLayer

__all__ = ["LayerSparsity", "SparsityReport", "sparsity_report", "state_tensors_per_value"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One sparse layer: its shape, non-zeros, kernel and bytes (dense vs sparse)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    nnz: int
    kernel: str
    dense_bytes: int
    sparse_bytes: int
    kernel_times: dict[str, float] | None = None

    @property
    def density(self) -> float:
        n = 1
        for s in self.shape:
            n *= s
        return self.nnz / n


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """The sparse layers of a model and what they hold (parameters + gradients + optimizer
    state, bytes), dense against sparse; ``str(report)`` is a table."""

    layers: tuple[LayerSparsity, ...]
    optimizer: str | None
    state_per_value: int
    updates: int = 0

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def sparse_bytes(self) -> int:
        return sum(layer.sparse_bytes for layer in self.layers)

    @property
    def saved_bytes(self) -> int:
        return self.dense_bytes - self.sparse_bytes

    @property
    def ratio(self) -> float:
        """Sparse bytes over dense bytes of the sparsified layers."""
        return self.sparse_bytes / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def density(self) -> float:
        """Non-zeros over weights, all sparse layers together."""
        total = sum(layer.nnz / layer.density for layer in self.layers)
        return sum(layer.nnz for layer in self.layers) / total if total else 1.0

    def __str__(self) -> str:
        what = f"with {self.optimizer} state ({self.state_per_value} per weight)" \
            if self.optimizer else "without optimizer state"
        lines = [f"sparse layers: {len(self.layers)}, density {self.density:.3f}, bytes of "
                 f"parameters + gradients {what}", ""]
        header = f"{'layer':<32} {'kind':<7} {'shape':<18} {'density':>8} {'kernel':>7} " \
                 f"{'dense':>11} {'sparse':>11}"
        lines += [header, "-" * len(header)]
        for layer in self.layers:
            lines.append(f"{layer.name:<32} {layer.kind:<7} {str(layer.shape):<18} "
                         f"{layer.density:>8.3f} {layer.kernel:>7} "
                         f"{format_bytes(layer.dense_bytes):>11} "
                         f"{format_bytes(layer.sparse_bytes):>11}")
        lines += ["-" * len(header),
                  f"{'total':<77} {format_bytes(self.dense_bytes):>11} "
                  f"{format_bytes(self.sparse_bytes):>11}",
                  f"sparse / dense: {self.ratio:.3f} (saved {format_bytes(self.saved_bytes)}); "
                  f"prune/regrow updates so far: {self.updates}"]
        return "\n".join(lines)


def state_tensors_per_value(optimizer: torch.optim.Optimizer | None,
                            param: nn.Parameter | None = None) -> int:
    """How many state tensors shaped like a parameter ``optimizer`` keeps for it: counted in its
    state when it has stepped, else from its kind (Adam/AdamW 2, 3 with amsgrad; SGD with
    momentum 1; 0 for others not yet stepped)."""
    if optimizer is None:
        return 0
    state = optimizer.state.get(param, {}) if param is not None else {}
    if state:
        return sum(1 for v in state.values()
                   if isinstance(v, torch.Tensor) and v.shape == param.shape and v.dim() >= 1)
    group = optimizer.param_groups[0]
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return 3 if group.get("amsgrad") else 2
    if isinstance(optimizer, torch.optim.SGD):
        return 1 if group.get("momentum", 0) else 0
    log.info("%s's state per parameter is not known before its first step; counted as 0",
             type(optimizer).__name__)
    return 0


def _layer_row(name: str, layer: SparseLayer, s: int) -> LayerSparsity:
    item = layer.values.element_size()
    bias = 0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size()
    per = 2 + s  # the tensor, its gradient, its state
    dense = (layer.numel_dense * item + bias) * per
    index = sum(b.numel() * b.element_size()
                for b in (layer.indices, layer.crow, layer.col) if b is not None)
    sparse = (layer.nnz * item + bias) * per + index
    return LayerSparsity(name=name, kind=type(layer).__name__.removeprefix("Sparse"),
                         shape=layer.weight_shape, nnz=layer.nnz, kernel=layer.kernel,
                         dense_bytes=dense, sparse_bytes=sparse,
                         kernel_times=dict(layer.kernel_times) if layer.kernel_times else None)


def sparsity_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    updates: int = 0) -> SparsityReport:
    """The :class:`SparsityReport` of ``model``'s sparse layers (with ``optimizer``'s state)."""
    rows, per_value = [], 0
    for name, layer in model.named_modules():
        if isinstance(layer, SparseLayer):
            s = state_tensors_per_value(optimizer, layer.values)
            per_value = max(per_value, s)
            rows.append(_layer_row(name, layer, s))
    return SparsityReport(layers=tuple(rows),
                          optimizer=None if optimizer is None else type(optimizer).__name__,
                          state_per_value=per_value, updates=updates)
