"""Scratch memory of kernels whose buffers depend on the build: measured once per shape, not assumed.

The CPU flash-attention kernels (``_scaled_dot_product_flash_attention_for_cpu`` and its
backward) allocate, through PyTorch's allocator, per-thread blocks of the attention matrix, fp32
accumulators for reduced-precision inputs and contiguous copies -- sizes that follow the kernel's
block sizes, the thread count and the dtype (on this build, for a (8, 8, 256, 64) fp32 step the
backward holds 4.5 MB beyond its 12.6 MB of gradients; in bf16 the forward holds 4.5 MB beyond its
output). bf16 matrix products on the CPU (oneDNN) pack their operands in buffers of the same
allocator (a (2048, 8192) x (8192, 512) product: 6.6 MB), and so do bf16 convolutions beyond the
weight reorders fp32's are known to make (WRN-16-2's 128-channel 3x3 gradient at batch 64,
channels-last: 1.26 MB, where fp32's holds its two weight copies, 0.59 MB). Rather than copy those
rules, :func:`measured_scratch` runs the op once on tensors of the node's shapes and dtypes (and
channels-last, for the convolutions Inductor's layout optimisation runs so) and measures, with the
allocator, what it holds beyond its outputs at its peak; the answer is cached per shape, dtype,
arguments and thread count. The CSR sparse product's ops (:mod:`fxmem.levers.sparse.kernels`)
are measured in every dtype, on a valid CSR pattern of their shapes: ``torch.sparse``'s dense
results, the transposes and fp32 copies of bf16 operands they make are 1-3x their outputs (a
(256, 256) x (256, 1024) product at density 0.05: 1.5 MB beyond its 1 MB output).
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from fxmem.graph.torch_compat import UNSET_FAKE_TEMPORARILY, is_op_overload

__all__ = ["measured_scratch", "measures", "MEASURED_OPS"]

log = logging.getLogger(__name__)
_CACHE: dict = {}  # (op, argument specs, threads) -> bytes measured
MEASURED_OPS = frozenset({
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::convolution", "aten::convolution_backward",
    *("fxmem_sparse::" + op for op in ("csr_linear", "csr_linear_t", "csr_sddmm")),
})
# matrix products hold scratch only in reduced precision on the CPU (oneDNN packs its operands
# through PyTorch's allocator; MKL's fp32 GEMM does not allocate there); fp32 convolutions'
# scratch is a rule of fxmem.memory.storages.scratch_bytes (their weight reorders)
_REDUCED_ONLY = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                           "aten::convolution", "aten::convolution_backward"})
_CONVOLUTIONS = frozenset({"aten::convolution", "aten::convolution_backward"})
# the CSR sparse product's ops (fxmem.levers.sparse.kernels): their arguments' positions of
# (values, crow, col) and how the CSR weight's column count is read from the arguments
_CSR_OPS = {
    "fxmem_sparse::csr_linear": ((1, 3, 4), lambda a: a[0].shape[-1]),
    "fxmem_sparse::csr_linear_t": ((1, 2, 3), lambda a: a[4]),
    "fxmem_sparse::csr_sddmm": ((2, 3, 4), lambda a: a[1].shape[-1]),
}


def _spec(x):
    if isinstance(x, torch.fx.Node):
        x = x.meta.get("val")
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):
        return ("seq", tuple(_spec(v) for v in x))
    if x is None or isinstance(x, (bool, int, float, str)):
        return ("const", x)
    return None


def _reduced(args) -> bool:
    return any(a[0] == "tensor" and a[3] in (torch.bfloat16, torch.float16) for a in args)


def measures(node: torch.fx.Node) -> bool:
    """Whether :func:`measured_scratch` measures ``node``'s op (on the CPU): the attention
    kernels, the CSR sparse product's ops, and matrix products and convolutions in reduced
    precision."""
    if node.op != "call_function" or not is_op_overload(node.target):
        return False
    return _measured(node.target._schema.name, lambda: tuple(_spec(a) for a in node.args))


def _measured(name: str, specs) -> bool:
    """``specs()``: the op's argument specs, computed only for ops measured in reduced
    precision alone."""
    return name in MEASURED_OPS and (name not in _REDUCED_ONLY or _reduced(specs()))


def _channels_last(spec):
    """A 4-D tensor's spec with channels-last strides (how Inductor runs a convolution)."""
    if spec[0] != "tensor" or len(spec[1]) != 4:
        return spec
    n, c, h, w = spec[1]
    return ("tensor", spec[1], (h * w * c, 1, w * c, c), spec[3])


def measured_scratch(node: torch.fx.Node, device: torch.device, *,
                     channels_last: bool = False) -> int:
    """Bytes ``node``'s op holds beyond its outputs at its peak, measured on ``device`` (CPU,
    for the ops :func:`measures`); 0 for other ops, or when it cannot be measured.
    ``channels_last``: a convolution's 4-D tensors are measured channels-last."""
    if device.type != "cpu" or node.op != "call_function" or not is_op_overload(node.target):
        return 0
    args = tuple(_spec(a) for a in node.args)
    if not _measured(node.target._schema.name, lambda: args):
        return 0
    kwargs = tuple(sorted((k, _spec(v)) for k, v in node.kwargs.items()))
    if any(a is None for a in args) or any(v is None for _, v in kwargs):
        return 0
    if channels_last and node.target._schema.name in _CONVOLUTIONS:
        args = tuple(_channels_last(a) for a in args)
    key = (node.target, args, kwargs, torch.get_num_threads())
    if key not in _CACHE:
        scratch = _measure(*key)
        if isinstance(scratch, _NotMeasured):
            return 0
        _CACHE[key] = scratch
    return _CACHE[key]


def _materialise(spec, generator):
    kind = spec[0]
    if kind == "tensor":
        _, shape, stride, dtype = spec
        t = torch.empty_strided(shape, stride, dtype=dtype)
        if dtype.is_floating_point:
            t.normal_(generator=generator)
        else:
            t.zero_()
        return t
    if kind == "seq":
        return [_materialise(s, generator) for s in spec[1]]
    return spec[1]


def _csr_pattern(name: str, args: list) -> None:
    """A valid CSR pattern in the sparse op's ``crow``/``col`` arguments (materialised as zeros):
    its values spread evenly over the rows, each row's columns evenly spaced."""
    (v, r, c), cols = _CSR_OPS[name]
    nnz, rows = args[v].numel(), args[r].numel() - 1
    crow = torch.div(torch.arange(rows + 1) * nnz, rows, rounding_mode="floor")
    counts = (crow[1:] - crow[:-1]).tolist()
    n_cols = cols(args)
    col = torch.cat([torch.div(torch.arange(k) * n_cols, max(k, 1), rounding_mode="floor")
                     for k in counts]) if nnz else torch.zeros(0, dtype=torch.long)
    args[r] = crow.to(args[r].dtype)
    args[c] = col.to(args[c].dtype)


class _NotMeasured(int):
    """0 bytes, not cached: measured when no measurement runs."""


_NOT_MEASURED = _NotMeasured(0)


def _measure(op, args, kwargs, threads: int) -> int:
    from fxmem.memory.measure import profiling

    if profiling():  # planned inside a measurement: a second profiler would cut the first short
        log.info("fxmem: %s's scratch is not measured while a measurement runs; counted as none "
                 "in this plan", op)
        return _NOT_MEASURED
    with UNSET_FAKE_TEMPORARILY()():  # planning runs under the compile's fake mode
        return _measure_real(op, args, kwargs, threads)


def _measure_real(op, args, kwargs, threads: int) -> int:
    from fxmem.memory.measure import measure_memory

    generator = torch.Generator().manual_seed(0)
    real_args = [_materialise(a, generator) for a in args]
    if op._schema.name in _CSR_OPS:
        _csr_pattern(op._schema.name, real_args)
    real_kwargs = {k: _materialise(v, generator) for k, v in kwargs}
    inputs = [t for t in real_args if isinstance(t, torch.Tensor)]
    outputs = []
    try:
        with torch.no_grad():
            op(*real_args, **real_kwargs)  # warm: first-call allocations are not the step's
            measured = measure_memory(lambda: outputs.append(op(*real_args, **real_kwargs)),
                                      device="cpu", baseline=inputs)
    except Exception as exc:  # e.g. a profiler already running: the op is counted without it
        log.debug("fxmem: could not measure %s's scratch (%s); counted as none", op, exc)
        return 0
    out = outputs[0]
    out = out if isinstance(out, (tuple, list)) else (out,)
    held = sum(t.untyped_storage().nbytes() for t in out if isinstance(t, torch.Tensor))
    scratch = max(0, measured.peak - measured.start - held)
    log.debug("fxmem: %s holds %d bytes of scratch beyond its outputs (%d threads)", op,
              scratch, threads)
    return scratch
