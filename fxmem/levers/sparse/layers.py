"""Sparse layers whose trainable weight is the vector of its non-zero values.

A :class:`SparseLinear` (or :class:`SparseConv2d`) holds

- ``values``: an ``nn.Parameter`` of length nnz -- so its gradient and any optimizer's state
  (Adam's moments, SGD's momentum) are O(nnz);
- ``indices``: an int32 buffer of length nnz, the flat positions of the values in the dense
  weight (row-major, sorted ascending, unique);
- ``bias``: dense, as in the layer it replaces.

The forward computes with one of two kernels, chosen per layer (:mod:`fxmem.levers.sparse.kernels`
measures which is faster):

- ``"dense"`` (transient dense): the dense weight is materialised inside the forward and again
  inside the backward, one layer at a time, and not kept between them
  (:mod:`fxmem.levers.sparse.functions`); the backward reads the dense weight's gradient at
  ``indices``. These are ordinary ATen ops: fxmem's capture traces them and its memory model
  counts the transient weight and gradient;
- ``"csr"``: a CSR sparse product (``torch.sparse.mm``) as an opaque custom op, with int32
  ``crow``/``col`` buffers (not saved: derived from ``indices``).

Either way the gradient with respect to ``values`` is the masked dense layer's gradient at the
non-zeros, exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fxmem.levers.sparse.functions import densify, sparse_conv2d, sparse_linear

__all__ = ["SparseLayer", "SparseLinear", "SparseHFConv1D", "SparseConv2d", "KERNELS",
           "INDEX_DTYPE"]

log = logging.getLogger(__name__)

KERNELS = ("dense", "csr")
INDEX_DTYPE = torch.int32


class SparseLayer(nn.Module):
    """A layer whose weight (of shape ``weight_shape``) is stored as ``values`` at ``indices``."""

    weight_shape: tuple[int, ...]

    def _init_sparse(self, weight: torch.Tensor, indices: torch.Tensor,
                     bias: torch.Tensor | None) -> None:
        self.weight_shape = tuple(weight.shape)
        flat = indices.to(torch.long)
        self.values = nn.Parameter(weight.detach().reshape(-1)[flat].clone(),
                                   requires_grad=weight.requires_grad)
        self.register_buffer("indices", indices.to(device=weight.device, dtype=INDEX_DTYPE))
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.bias = bias  # the dense layer's own Parameter: its optimizer state stays valid
        self.register_buffer("crow", None, persistent=False)
        self.register_buffer("col", None, persistent=False)
        self.kernel = "dense"
        self.kernel_times: dict[str, float] | None = None  # seconds per fwd+bwd, when measured
        # RigL's scoring pass: called with the dense weight (a leaf) to watch its gradient
        self._probe: Callable[[torch.Tensor], None] | None = None

    # ------------------------------------------------------------------ structure
    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def numel_dense(self) -> int:
        n = 1
        for s in self.weight_shape:
            n *= s
        return n

    @property
    def density(self) -> float:
        return self.nnz / self.numel_dense

    def _filled(self, dense: nn.Module) -> nn.Module:
        """``dense`` (the layer's dense module, just built) with this layer's weight and bias."""
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.weight.requires_grad_(self.values.requires_grad)
        return dense

    def dense_weight(self) -> torch.Tensor:
        """The dense weight (a new tensor, without autograd history)."""
        with torch.no_grad():
            return self._densify(self.values)

    def mask(self) -> torch.Tensor:
        """The dense boolean mask of the non-zero positions."""
        m = torch.zeros(self.numel_dense, dtype=torch.bool, device=self.indices.device)
        m[self.indices.long()] = True
        return m.view(self.weight_shape)

    def set_kernel(self, kernel: str) -> None:
        """Compute with ``"dense"`` (transient dense weight) or ``"csr"`` (sparse product)."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "csr" and len(self.weight_shape) != 2:
            raise ValueError(f"the csr kernel is for linear layers, not {type(self).__name__}")
        self.kernel = kernel
        self.indices_changed()

    def indices_changed(self) -> None:
        """Refresh what is derived from ``indices`` (the CSR buffers) after they were written."""
        if self.kernel != "csr":
            self.crow, self.col = None, None
            return
        rows, cols = self.weight_shape
        flat = self.indices.long()
        row = torch.div(flat, cols, rounding_mode="floor")
        counts = torch.bincount(row, minlength=rows)
        crow = torch.zeros(rows + 1, dtype=INDEX_DTYPE, device=flat.device)
        crow[1:] = torch.cumsum(counts, 0).to(INDEX_DTYPE)
        self.crow, self.col = crow, (flat - row * cols).to(INDEX_DTYPE)

    # ------------------------------------------------------------------ compute
    def _densify(self, values: torch.Tensor) -> torch.Tensor:
        return densify(values, self.indices, self.weight_shape)

    def _probed_weight(self) -> torch.Tensor:
        """RigL's scoring pass (eager only): the dense weight as a leaf whose gradient the probe
        watches."""
        w = self._densify(self.values.detach()).requires_grad_()
        self._probe(w)
        return w

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        values = state_dict.get(prefix + "values")
        indices = state_dict.get(prefix + "indices")
        if values is not None and indices is not None and values.numel() != self.nnz:
            # another number of non-zeros (e.g. saved at another density): take the saved size
            log.info("%s: loading %d non-zeros into a layer of %d", prefix or "layer",
                     values.numel(), self.nnz)
            self.values = nn.Parameter(self.values.new_empty(values.shape),
                                       requires_grad=self.values.requires_grad)
            self.indices = self.indices.new_empty(indices.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.indices_changed()

    def extra_repr(self) -> str:
        return (f"weight_shape={self.weight_shape}, nnz={self.nnz}, density={self.density:.3f}, "
                f"kernel={self.kernel!r}, bias={self.bias is not None}")


class SparseLinear(SparseLayer):
    """``nn.Linear`` with a sparse weight (see the module's docstring)."""

    def __init__(self, weight: torch.Tensor, indices: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._init_sparse(weight, indices, bias)

    @classmethod
    def from_dense(cls, layer: nn.Linear, indices: torch.Tensor) -> "SparseLinear":
        return cls(layer.weight, indices, layer.bias)

    def to_dense_module(self) -> nn.Linear:
        """An ``nn.Linear`` with this layer's dense weight and bias."""
        values = self.values
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=values.device, dtype=values.dtype)
        return self._filled(dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._probe is not None:
            return F.linear(x, self._probed_weight(), self.bias)
        if self.kernel == "csr":
            from fxmem.levers.sparse.kernels import csr_linear

            y = csr_linear(x, self.values, self.indices, self.crow, self.col, self.out_features)
            return y if self.bias is None else y + self.bias
        return sparse_linear(x, self.values, self.indices, self.bias, self.weight_shape)


class SparseHFConv1D(SparseLinear):
    """Hugging Face's ``Conv1D`` (a linear layer whose weight is stored (in, out)) with a sparse
    weight: a :class:`SparseLinear` of its transposed weight, exported back as a ``Conv1D``
    (so a dense model's ``state_dict`` keeps Hugging Face's layout)."""

    @classmethod
    def from_dense(cls, layer: nn.Module, indices: torch.Tensor) -> "SparseHFConv1D":
        """``indices``: flat positions in the (out, in) weight, ``layer.weight.t()``."""
        return cls(layer.weight.t(), indices, layer.bias)

    def to_dense_module(self) -> nn.Module:
        """A ``transformers`` ``Conv1D`` with this layer's dense weight (transposed back)."""
        from transformers.pytorch_utils import Conv1D

        values = self.values
        dense = Conv1D(self.out_features, self.in_features).to(device=values.device,
                                                              dtype=values.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight().t())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
            elif dense.bias is not None:
                dense.bias = None
        dense.weight.requires_grad_(self.values.requires_grad)
        return dense


class SparseConv2d(SparseLayer):
    """``nn.Conv2d`` (zero padding) with a sparse weight, computed with a transient dense one."""

    def __init__(self, weight: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                 *, stride, padding, dilation, groups: int):
        super().__init__()
        self.out_channels = weight.shape[0]
        self.in_channels = weight.shape[1] * groups
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self._init_sparse(weight, indices, bias)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, indices: torch.Tensor) -> "SparseConv2d":
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"cannot sparsify a Conv2d with padding_mode={layer.padding_mode!r}, "
                             f"padding={layer.padding!r}: zero padding by numbers only")
        return cls(layer.weight, indices, layer.bias, stride=layer.stride, padding=layer.padding,
                   dilation=layer.dilation, groups=layer.groups)

    def to_dense_module(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with this layer's dense weight and bias."""
        values = self.values
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                          stride=self.stride, padding=self.padding, dilation=self.dilation,
                          groups=self.groups, bias=self.bias is not None,
                          device=values.device, dtype=values.dtype)
        return self._filled(dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._probe is not None:
            return F.conv2d(x, self._probed_weight(), self.bias, self.stride, self.padding,
                            self.dilation, self.groups)
        return sparse_conv2d(x, self.values, self.indices, self.bias, self.weight_shape,
                             self.stride, self.padding, self.dilation, self.groups)
