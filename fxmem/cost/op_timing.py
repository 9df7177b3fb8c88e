"""Measured seconds of one op on its device: how :mod:`fxmem.cost.step` prices matrix products,
the sparse lever's CSR products and (where they are not fused) indexing ops.

:func:`measured_seconds` runs a node's op on random inputs like its traced ones (the CSR products
on a random pattern with the layer's non-zeros, an indexing op's indices random within the
indexed sizes) and takes the best of a few calls, once per (op, input shapes, dtypes, strides,
other arguments, torch's thread count) in the process: the first measurement of a signature is
kept for the process (:func:`clear_measured` forgets them), so planning stays deterministic
within it. None where an op cannot run (the meta device, an error).

A large matrix product (``mm``, ``addmm``, ``bmm`` of at least ``4 * SLICE_FLOPS``) is measured
on a slice of its largest output dimension (the batch of a ``bmm``, else the rows or the columns;
``1 / SLICE_PARTS`` of it at least, and its extent the whole's modulo 64), its inputs' strides
kept, and the time scaled by the whole extent over the slice's (:func:`sliced_seconds`); on a
CPU, where an output over 32 MiB is mapped afresh at every call, the slice of such a product
writes into a new mapping too. The slice grows until one call lasts ``SLICE_MIN_S``, so a
product is measured whole where the device runs it faster than that (a GPU). On one core of the
2-core EPYC, GPT-2's vocabulary products (2048 x 768 by 768 x 50257 and their gradients'
products, 1.7-2.4 s each) measured on a sixteenth came within 2-5% of the whole's time; measured
whole, with the warm-up call, they took 30 of the 40 s of a GPT-2 exploration's step times.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch.fx.node import map_arg

from fxmem.cost.model import _materialize, _signature, _tensor_bytes, node_flops
from fxmem.graph.ops import node_value, tensors
from fxmem.graph.torch_compat import pytree

__all__ = ["measured_seconds", "sliced_seconds", "clear_measured", "measured_count",
           "SLICE_FLOPS", "SLICE_MIN_S"]

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: The sparse lever's CSR products (no FLOP formula): measured on a random pattern.
_CSR_OPS = ("csr_linear", "csr_linear_t", "csr_sddmm")
#: Indexing ops: fused under Inductor unless :func:`~fxmem.cost.step.inductor_falls_back`; else
#: measured like the products, on random valid indices (ATen's accumulating index_put sorts its
#: indices).
_INDEXING = {aten.index_put.default, aten.index_put_.default, aten.index.Tensor,
             aten.gather.default, aten._unsafe_masked_index_put_accumulate.default}
# signature (with torch's thread count) -> seconds (None: could not run): one per process
_MEASURED: dict[tuple, float | None] = {}
#: A product of at least 4x this many FLOPs is measured on a slice of about this many first.
SLICE_FLOPS = 4e9
#: A slice is grown (x4) until one call lasts this long; one that reaches half the product's
#: extent first is not used (the product is measured whole).
SLICE_MIN_S = 0.025
#: A slice is this fraction of the product at least (1 / SLICE_PARTS of its extent).
SLICE_PARTS = 16
_SLICEABLE = {aten.mm.default, aten.addmm.default, aten.bmm.default}
_SLICE_MIN_EXTENT = 256  # a slice's rows (columns, batch) at least: a thin product runs slower
# glibc maps an allocation over 32 MiB (its largest mmap threshold) afresh at every call
_MAPPED_BYTES = 32 * 2**20


def clear_measured() -> None:
    """Forget the ops measured in this process (the next step prices time them again)."""
    _MEASURED.clear()


def measured_count() -> int:
    """How many distinct op signatures this process has measured."""
    return len(_MEASURED)


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return getattr(getattr(target, "_schema", None), "name", "").split("::")[-1]


def _is_csr(node: torch.fx.Node) -> bool:
    name = getattr(getattr(node.target, "_schema", None), "name", "")
    return name.startswith("fxmem_sparse::") and name.split("::")[-1] in _CSR_OPS


def _device_of(node: torch.fx.Node) -> torch.device | None:
    for t in tensors(node.meta.get("val")):
        return t.device
    return None


def _pattern(rows: int, cols: int, nnz: int, generator: torch.Generator,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random CSR pattern (crow, col as int32) of ``nnz`` positions in ``rows x cols``,
    spread evenly over the rows as a magnitude pruning of a random matrix spreads them."""
    flat = torch.randperm(rows * cols, generator=generator)[:nnz].sort().values
    row, col = flat // cols, flat % cols
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(row, minlength=rows).cumsum(0)
    return crow.to(torch.int32).to(device), col.to(torch.int32).to(device)


def _csr_args(node: torch.fx.Node, device: torch.device) -> tuple | None:
    """Valid arguments like the node's (random values on a random pattern of its non-zeros)."""
    args = map_arg(node.args, node_value)
    if any(not isinstance(a, torch.Tensor) for a in args if a is not None
           and not isinstance(a, int)):
        return None
    generator = torch.Generator().manual_seed(0)
    mat = lambda t: _materialize(t, device)  # noqa: E731
    name = _op_name(node)
    if name == "csr_linear":  # (x, values, indices, crow, col, out_features)
        x, values, _, crow, _, out = args
        rows, cols = int(out), int(x.shape[-1])
    elif name == "csr_linear_t":  # (grad, values, crow, col, in_features)
        grad, values, crow, _, cols = args
        rows, cols = int(grad.shape[-1]), int(cols)
    else:  # csr_sddmm (grad, x, values, crow, col)
        grad, x, values, crow, _ = args
        rows, cols = int(grad.shape[-1]), int(x.shape[-1])
    nnz = int(values.numel())
    if crow.numel() != rows + 1 or nnz > rows * cols:
        return None
    crow_r, col_r = _pattern(rows, cols, nnz, generator, device)
    vals = mat(values)
    if name == "csr_linear":
        return (mat(x), vals, torch.arange(nnz, device=device, dtype=torch.int32), crow_r,
                col_r, rows)
    if name == "csr_linear_t":
        return (mat(grad), vals, crow_r, col_r, cols)
    return (mat(grad), mat(x), vals, crow_r, col_r)


def _index_args(node: torch.fx.Node, device: torch.device) -> tuple[tuple, dict]:
    """Arguments like an indexing node's, its index tensors random within the indexed sizes
    (zeros would send every element to one place)."""
    args, kwargs = pytree.tree_map(lambda x: _materialize(x, device),
                                   map_arg((node.args, node.kwargs), node_value))
    args = list(args)
    generator = torch.Generator(device=device).manual_seed(0)

    def randomised(t, bound: int):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.dtype == torch.bool:
            return t
        return torch.randint(0, max(1, bound), t.shape, generator=generator, device=device,
                             dtype=t.dtype)

    shape = args[0].shape
    if node.target == aten.gather.default:  # (self, dim, index)
        args[2] = randomised(args[2], shape[args[1]])
    else:  # index / index_put / masked index put: (self, [mask,] indices, ...)
        at = 2 if node.target == aten._unsafe_masked_index_put_accumulate.default else 1
        args[at] = [randomised(t, shape[i]) if i < len(shape) else t
                    for i, t in enumerate(args[at])]
    return tuple(args), kwargs


def _best_seconds(fn, device: torch.device, calls: int = 50, budget_s: float = 0.1) -> float:
    """The fewest seconds of ``fn`` over the calls made after a warm-up: at least one, then more
    while ``budget_s`` lasts (at most ``calls``): a busy machine only adds time. A call that
    alone outlasts the budget is timed once, so GPT-2's vocabulary products (seconds each on a
    CPU core) are not run ten times each (they were: 319 s of a 507 s exploration)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    fn()
    sync(device)
    best, n, deadline = float("inf"), 0, time.perf_counter() + budget_s
    while n < 1 or (time.perf_counter() < deadline and n < calls):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


def _slice_dims(node: torch.fx.Node) -> tuple[int, int, list[tuple[int, int]]] | None:
    """How to slice a product's largest output dimension (the batch of a ``bmm``, else its rows
    or its columns: the other operand, packed whole at every call, is then the smaller): its
    extent, the output's dimension and, per argument, the dimension of that argument it is
    (``(argument index, dim)``); None for other ops and arguments that are not plain tensors of
    a product's ranks."""
    if node.target not in _SLICEABLE:
        return None
    args = map_arg(node.args, node_value)
    first = 1 if node.target == aten.addmm.default else 0
    if len(args) < first + 2:
        return None
    a, b = args[first], args[first + 1]
    rank = 3 if node.target == aten.bmm.default else 2
    if not all(isinstance(t, torch.Tensor) and t.dim() == rank for t in (a, b)):
        return None
    if rank == 3:  # (B, M, K) x (B, K, N) -> (B, M, N)
        choices = [(int(a.shape[0]), 0, [(first, 0), (first + 1, 0)]),
                   (int(a.shape[1]), 1, [(first, 1)]), (int(b.shape[2]), 2, [(first + 1, 2)])]
    else:  # (M, K) x (K, N) -> (M, N)
        choices = [(int(a.shape[0]), 0, [(first, 0)]), (int(b.shape[1]), 1, [(first + 1, 1)])]
    extent, out_dim, dims = max(choices, key=lambda c: c[0])
    if first:  # addmm's bias: (N,), (1, N), (M, N) or (M, 1), broadcast over the output
        bias = args[0]
        if not isinstance(bias, torch.Tensor) or bias.dim() > 2:
            return None
        bias_dim = out_dim - (2 - bias.dim())
        if bias_dim >= 0 and bias.shape[bias_dim] != 1:
            dims = [*dims, (0, bias_dim)]
    return extent, out_dim, dims


def _slice_of(t: torch.Tensor, dim: int, extent: int, device: torch.device) -> torch.Tensor | None:
    """A real tensor like fake ``t`` with ``extent`` along ``dim``: ``t``'s strides (the
    product reads it as it would the whole), only the elements it holds written (random)."""
    size = list(t.shape)
    size[dim] = extent
    stride = tuple(t.stride())
    if any(st == 0 and s > 1 for s, st in zip(size, stride)):
        return None  # broadcast: random values cannot be written into it
    span = 0 if 0 in size else 1 + sum((s - 1) * st for s, st in zip(size, stride))
    view = torch.empty(span, device=device, dtype=t.dtype).as_strided(size, stride)
    # uniform, not normal: normal_ on a strided view is ~8x slower (0.78 s for a slice of
    # GPT-2's transposed vocabulary gradient), and the values do not change a product's time
    return view.uniform_(-1, 1) if t.dtype.is_floating_point else view.zero_()


def _whole_of(t, device: torch.device):
    """A real tensor like ``t`` (filled as a slice is: uniform is faster than normal), or
    ``_materialize``'s where it is not a plain tensor."""
    if isinstance(t, torch.Tensor) and t.dim() > 0:
        whole = _slice_of(t, 0, int(t.shape[0]), device)
        if whole is not None:
            return whole
    return _materialize(t, device)


def _into_fresh(op, args, kwargs, shape: tuple, dtype: torch.dtype) -> None:
    """``op``'s out= form into a new anonymous mapping of ``shape``: its pages faulted in as the
    product writes them, as a whole output allocated afresh is."""
    import mmap

    count = math.prod(shape)
    mapping = mmap.mmap(-1, max(1, count * dtype.itemsize))
    try:
        out = torch.frombuffer(mapping, dtype=dtype, count=count).view(shape)
        op.overloadpacket.out(*args, **kwargs, out=out)
        del out
    finally:
        try:
            mapping.close()
        except BufferError:  # still exported: closed when collected
            pass


def sliced_seconds(node: torch.fx.Node, device: torch.device) -> float | None:
    """Seconds of a large matrix product (``mm``, ``addmm``, ``bmm`` of at least ``4 *
    SLICE_FLOPS``) from a slice of its largest output dimension: measured on about
    ``SLICE_FLOPS`` (256 at least along it) first, grown x4 until one call lasts
    ``SLICE_MIN_S``, and scaled by the whole extent over the slice's. None where it is not
    sliced (another op, a smaller product, a slice that reaches half the extent first: measure it
    whole). A call's fixed costs are scaled with the rest: a slice of rows of a product whose
    other operand is large (GPT-2's 2048 x 50257 by 50257 x 768, its 154 MB weight packed at
    each call) reads up to ~10% over the whole; extrapolating along two slices instead read
    0.89-1.2 of the whole at load 2.5."""
    found = _slice_dims(node)
    if found is None:
        return None
    flops = node_flops(node)
    if flops < 4 * SLICE_FLOPS:
        return None
    whole, out_dim, dims = found
    extent = max(-(-whole // SLICE_PARTS), -(-int(whole * SLICE_FLOPS) // flops))
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return None
    # a CPU allocates an output over 32 MiB afresh at every call (glibc maps it anew: its page
    # faults cost ~1.3 ms per MiB inside a product): the slice writes into a new mapping too
    fresh = device.type == "cpu" and _tensor_bytes(out) > _MAPPED_BYTES
    if fresh and not out.is_contiguous():  # else its own output is mapped afresh: over 32 MiB
        extent = max(extent, int(_MAPPED_BYTES * whole // _tensor_bytes(out)) + 1)
        fresh = False
    # the slice's extent is the whole's modulo 64: an odd extent runs slower per row (column)
    # than a multiple of 64 (GPT-2's vocabulary product: 52 us per column at 50257 and 25129
    # columns, 37 at 50176 and 25088; a 6283-column slice 56, a 6336-column one 37)
    rest = whole % 64

    def aligned(e: int) -> int:
        return rest + 64 * max(0, -(-(max(e, _SLICE_MIN_EXTENT) - rest) // 64))

    extent = aligned(extent)
    fakes = list(map_arg(node.args, node_value))
    kwargs = map_arg(node.kwargs, node_value)
    cut = {at for at, _ in dims}
    args = [a if i in cut else _whole_of(a, device) for i, a in enumerate(fakes)]

    def timed(e: int) -> float:  # seconds of the slice of extent e
        sliced = list(args)
        for at, dim in dims:
            sliced[at] = _slice_of(fakes[at], dim, e, device)
            if sliced[at] is None:
                raise ValueError("a broadcast input")
        if fresh:
            shape = (*out.shape[:out_dim], e, *out.shape[out_dim + 1:])
            return _best_seconds(lambda: _into_fresh(node.target, sliced, kwargs, shape,
                                                     out.dtype), device)
        return _best_seconds(lambda: node.target(*sliced, **kwargs), device)

    try:
        while 2 * extent <= whole:
            seconds = timed(extent)
            if seconds >= SLICE_MIN_S:
                return seconds * whole / extent
            extent = aligned(4 * extent)
    except Exception as exc:  # measured whole instead
        log.debug("cannot measure %s on a slice: %s", node.name, exc)
    return None


def measured_seconds(node: torch.fx.Node) -> float | None:
    """Seconds of one call of ``node``'s op on its device on random inputs like its own (the
    best of a few calls), measured once per signature in the process; None when it cannot run
    (the meta device, an unknown signature, an error)."""
    device = _device_of(node)
    if device is None or device.type == "meta":
        return None
    key = _signature(node)
    if key is None:
        return None
    key = (*key, torch.get_num_threads())
    if key in _MEASURED:
        return _MEASURED[key]
    seconds = None
    try:
        with torch.no_grad():
            if _is_csr(node):
                args, kwargs = _csr_args(node, device), {}
                if args is None:
                    raise ValueError("no valid CSR arguments")
            elif node.target in _INDEXING:
                args, kwargs = _index_args(node, device)
            elif (seconds := sliced_seconds(node, device)) is not None:
                args = None  # measured on a slice
            else:
                inputs = map_arg((node.args, node.kwargs), node_value)
                args, kwargs = pytree.tree_map(lambda x: _materialize(x, device), inputs)
            if args is not None:
                seconds = _best_seconds(lambda: node.target(*args, **kwargs), device)
    except Exception as exc:  # invalid random inputs, no kernel for the device
        log.debug("cannot measure %s (%s): %s", node.name, node.target, exc)
    _MEASURED[key] = seconds
    return seconds
