"""The vocabulary of the batch analysis: a value's batch state, families of ATen ops, and helpers
to read an op's arguments and shapes. :mod:`fxmem.batch_propagation` applies a rule per family.
"""

from __future__ import annotations

import dataclasses


from fxmem.graph.ops import op_name  # noqa: F401 (re-exported)
from fxmem.graph.ops import schema_arguments as op_kwargs  # noqa: F401 (re-exported)

__all__ = ["ALONG_OPS", "ATTENTION_OPS", "BATCH_NORM_OPS", "BatchState", "CONST_OPS",
           "EINSUM_OPS", "GROUPED_MM_OPS", "LOSS_OPS", "NLL_OPS", "Problem", "REDUCE_OPS",
           "Reordered", "SAME_OPS", "SLICE_OPS", "U_AWARE_OPS", "VIEW_OPS", "leading_independent",
           "op_kwargs", "op_name", "place_values", "shape_of"]


@dataclasses.dataclass(frozen=True)
class Reordered:
    """A value that follows a ``sort`` along the batch dim (a mixture-of-experts dispatch: rows
    sorted by expert, gathered, multiplied per group, put back in order). Let P be the sort's
    indices into the sorted dim (``size`` rows, the batch its top digit). ``kind``:

    - "keys": the sorted values themselves; along ``dim`` row i is row P[i]'s key;
    - "rows": along ``dim`` row i belongs to the sample of row P[i] (computed from it alone);
    - "index": also "rows", and its values are P[i] // ``div``: positions in a dim of
      ``size // div`` rows (whose batch is its top digit), in the same sample as row P[i];
    - "groups": the number of sorted keys per group, or their running sum (grouped-matmul
      offsets): each row's group is its own key;
    - "inverse": in the batch's order, the position of each row in the sorted order (P's inverse).

    The value's :class:`BatchState` has no batch dim: a rule that does not know these kinds sees an
    unbatched value computed from batched ones, so the analysis stays conservative."""

    kind: str
    sort: str  # the sort node's name: values of one sort line up row by row
    dim: int = 0
    size: int = 0
    div: int = 1


@dataclasses.dataclass(frozen=True)
class BatchState:
    """What the analysis knows of one value: the dim carrying the batch (as one digit of that
    dim's index: ``outer`` copies of ``B`` blocks of ``size / (outer * B)``), or, unbatched, the
    dims it does not vary along, whether it derives from batched values, and whether it is
    ``arange`` along a dim."""

    dim: int | None = None  # the dim carrying the batch
    outer: int = 1  # batched: how many times the batch digit repeats within its dim, above it
    free: frozenset = frozenset()  # unbatched: dims the values do not vary along
    dep: bool = False  # unbatched but computed from batched values (a reduction over the batch)
    iota: int | None = None  # unbatched: value == index along this dim (arange)
    reordered: Reordered | None = None  # unbatched: rows in a sort's order (MoE dispatch)

    def at(self, d: int) -> BatchState:
        return dataclasses.replace(self, dim=d)


# ATen op names (overload and in-place "_" dropped), by the rule that handles them
CONST_OPS = {  # values independent of position: all dims free
    "ones", "zeros", "full", "empty", "empty_strided", "scalar_tensor", "new_ones", "new_zeros",
    "new_full", "new_empty", "new_empty_strided", "ones_like", "zeros_like", "full_like",
    "empty_like", "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "fill",
    "zero"}
SAME_OPS = {"alias", "detach", "clone", "contiguous", "_to_copy", "lift_fresh_copy", "to"}
VIEW_OPS = {"view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "flatten", "unflatten",
            "view_copy", "_reshape_alias"}
ALONG_OPS = {  # ops along a dim: over the batch they mix samples (of this kind)
    "_softmax": "batch_reduction", "_log_softmax": "batch_reduction",
    "_safe_softmax": "batch_reduction", "cumsum": "batch_reduction", "cumprod": "batch_reduction",
    "logcumsumexp": "batch_reduction", "cummax": "batch_reduction", "cummin": "batch_reduction",
    "sort": "batch_mixing", "topk": "batch_mixing", "flip": "batch_mixing", "roll": "batch_mixing",
    "glu": "batch_mixing"}
REDUCE_OPS = {
    "sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "prod",
    "logsumexp", "norm", "linalg_vector_norm", "any", "all", "argmax", "argmin", "count_nonzero",
    "nansum", "nanmean", "median", "mode", "aminmax"}
ATTENTION_OPS = {  # scaled dot-product attention kernels: (..., positions, features) operands
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_attention_math_for_mps"}
GROUPED_MM_OPS = {  # a row-wise matmul, each row by its group's matrix (transformers' fallback too)
    "_grouped_mm", "grouped_mm", "grouped_mm_fallback"}
EINSUM_OPS = {"mm": "ik,kj->ij", "bmm": "gik,gkj->gij", "mv": "ik,k->i", "dot": "k,k->",
              "addmm": "ik,kj->ij", "baddbmm": "gik,gkj->gij", "addmv": "ik,k->i",
              "addbmm": "gik,gkj->ij"}
BATCH_NORM_OPS = {
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
    "_native_batch_norm_legit_no_training", "cudnn_batch_norm", "miopen_batch_norm", "batch_norm",
    "_batch_norm_impl_index", "_batch_norm_with_update", "_batch_norm_no_update"}
LOSS_OPS = {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
            "binary_cross_entropy_with_logits", "soft_margin_loss"}
NLL_OPS = {"nll_loss_forward", "nll_loss2d_forward"}
SLICE_OPS = {"slice", "select", "split", "split_with_sizes", "unbind", "unsafe_split",
             "unsafe_split_with_sizes", "unsafe_chunk", "chunk"}
U_AWARE_OPS = VIEW_OPS | SAME_OPS | REDUCE_OPS | set(ALONG_OPS) | SLICE_OPS | set(EINSUM_OPS) | {
    "expand", "permute", "transpose", "t", "index", "_unsafe_index", "cat", "stack",
    "constant_pad_nd", "embedding"}  # rules that also track free dims of unbatched values


def leading_independent(name: str, ndim: int, kw: dict) -> int | None:
    """How many trailing dims an op mixes, keeping the leading ones independent; None: not such."""
    if name in ("convolution", "_convolution", "convolution_overrideable", "native_group_norm",
                "cudnn_convolution", "mkldnn_convolution", "_conv_depthwise2d"):
        return ndim - 1
    if name in ("native_layer_norm", "_fused_rms_norm"):
        return len(kw["normalized_shape"])
    if name == "csr_linear":  # the sparse lever's CSR product (fxmem_sparse): x @ W.T, row by row
        return 1
    if name in ("tril", "triu") or name.startswith("_scaled_dot_product"):
        return 2
    for k in (1, 2, 3):
        if f"{k}d" in name and any(w in name for w in ("pool", "upsample", "pad")):
            return k
    return None


def shape_of(x) -> tuple[int, ...]:
    return tuple(int(s) for s in x.meta["val"].shape)


def place_values(shape) -> list[int]:
    pv, acc = [1] * len(shape), 1
    for i in reversed(range(len(shape))):
        pv[i], acc = acc, acc * shape[i]
    return pv


class Problem(Exception):
    """Why an op mixes samples. ``kind``: "batch_norm" (BatchNorm in training mode),
    "batch_reduction" (a reduction, contraction or normalisation over the batch), "batch_mixing"
    (samples combined otherwise: reordered, sliced, reshaped apart) or "unsupported_op" (an op
    these rules do not know, fed a batched value)."""

    def __init__(self, kind: str, detail: str, momentum: float | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.momentum = kind, detail, momentum
