"""The CSR sparse product as custom ops, and the per-layer choice of kernel by measurement.

``fxmem_sparse::csr_linear(x, values, indices, crow, col, out_features)`` computes ``x @ W.T`` for
the CSR weight ``W`` (``torch.sparse.mm``, in the values' dtype: under bf16 casts a bf16 input
is multiplied in fp32, MKL having no bf16 CSR kernel, and the result cast back to bf16). It is a
``torch.library`` custom op with a fake
kernel, so TorchDynamo, AOTAutograd and ``make_fx`` trace it as one opaque node whose output the
memory model counts, and what ``torch.sparse`` and the dtype casts allocate inside it, measured
once per shape (:mod:`fxmem.memory.kernel_scratch`). It
also takes the layer's flat ``indices`` (checked against the values, not otherwise read): a
buffer the graph does not read is not a graph input, and fxmem's memory model counts what the
step's graph receives. Its backward is two more such ops: ``csr_linear_t`` (``grad @ W``, by the
transposed CSR product) and ``csr_sddmm`` (the gradient of the values: ``grad.T @ x`` sampled at
the non-zeros, ``torch.sparse.sampled_addmm``).

:func:`choose_kernel` times one forward+backward of a layer with each kernel on an input of the
shape it sees, and keeps the faster: on a CPU the transient dense weight usually wins (MKL's
dense GEMM against CSR at densities down to a few per cent), so nothing is assumed.

**One choice per layer configuration, per process.** Timings on a shared machine are noisy: two
kernels within a few per cent of each other would flip between calls, so the same model
sparsified twice (a joint exploration's combination, then the chosen point built again) could
run different kernels and so different plans. The choice is therefore made once per layer
configuration (layer type, weight shape, non-zeros, bias, input shape, dtype, device, whether
the values train) and kept for the process (:func:`kernel_choices`; :func:`clear_kernel_choices`
forgets them): every layer of that configuration, in every later sparsification of any model,
gets the same kernel without being timed again. And the rule is stable under noise: the CSR
product is taken only when it is faster than the transient dense weight by more than
:data:`CSR_MARGIN` (10%); within that margin the dense kernel (the default) is kept.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch

from fxmem.levers.sparse.layers import KERNELS, SparseLayer, SparseLinear

__all__ = ["csr_linear", "choose_kernel", "time_kernel", "time_kernels", "preferred_kernel",
           "kernel_choices", "clear_kernel_choices", "CSR_MARGIN"]

log = logging.getLogger(__name__)

#: The CSR product is chosen only when faster than the transient dense weight by more than this.
CSR_MARGIN = 0.10
# layer configuration -> (kernel chosen, seconds per kernel): one choice per process
_CHOICES: dict[tuple, tuple[str, dict[str, float]]] = {}


def _no_autocast(t: torch.Tensor):
    """Autocast off inside a kernel: under bf16 casts it would cast the CSR product's operands
    to bf16, which MKL's CSR product does not take."""
    return torch.autocast(t.device.type, enabled=False)


def _csr(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, cols: int) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, (crow.numel() - 1, cols),
                                       check_invariants=False)


@torch.library.custom_op("fxmem_sparse::csr_linear", mutates_args=())
def _csr_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, crow: torch.Tensor,
                col: torch.Tensor, out_features: int) -> torch.Tensor:
    if indices.numel() != values.numel() or col.numel() != values.numel():
        raise ValueError(f"{values.numel()} values with {indices.numel()} indices, {col.numel()} "
                         "columns")
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols).to(values.dtype)  # MKL's CSR product has no bf16 kernel
    with _no_autocast(x):
        y = torch.sparse.mm(_csr(values, crow, col, cols), x2.t()).t()
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype).contiguous()


@_csr_linear.register_fake
def _(x, values, indices, crow, col, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("fxmem_sparse::csr_linear_t", mutates_args=())
def _csr_linear_t(grad: torch.Tensor, values: torch.Tensor, crow: torch.Tensor,
                  col: torch.Tensor, in_features: int) -> torch.Tensor:
    rows = grad.shape[-1]
    g2 = grad.reshape(-1, rows).to(values.dtype)
    w = _csr(values, crow, col, in_features)
    with _no_autocast(grad):
        gx = torch.sparse.mm(w.t(), g2.t()).t()
    return gx.reshape(*grad.shape[:-1], in_features).to(grad.dtype).contiguous()


@_csr_linear_t.register_fake
def _(grad, values, crow, col, in_features):
    return grad.new_empty(*grad.shape[:-1], in_features)


@torch.library.custom_op("fxmem_sparse::csr_sddmm", mutates_args=())
def _csr_sddmm(grad: torch.Tensor, x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor,
               col: torch.Tensor) -> torch.Tensor:
    cols = x.shape[-1]
    g2 = grad.reshape(-1, grad.shape[-1]).to(values.dtype)
    x2 = x.reshape(-1, cols).to(values.dtype)
    pattern = _csr(torch.zeros_like(values), crow, col, cols)
    with warnings.catch_warnings(), _no_autocast(x):
        warnings.simplefilter("ignore", UserWarning)
        out = torch.sparse.sampled_addmm(pattern, g2.t().contiguous(), x2, beta=0.0)
    return out.values().clone()


@_csr_sddmm.register_fake
def _(grad, x, values, crow, col):
    return values.new_empty(values.shape)


def _setup(ctx, inputs, output):
    x, values, _, crow, col, _ = inputs
    ctx.save_for_backward(x, values, crow, col)


def _backward(ctx, grad):
    # the values' gradient first: it is the last read of x, which then dies before the input's
    # gradient is made; and the pointwise ops that read the input's gradient (an activation's
    # backward) come after both extern calls, where Inductor runs them. In the other order
    # Inductor fuses such ops into the kernel before csr_sddmm (they do not depend on it) --
    # a reordering fxmem's memory model of Inductor does not follow
    x, values, crow, col = ctx.saved_tensors
    gv = _csr_sddmm(grad, x, values, crow, col) if ctx.needs_input_grad[1] else None
    gx = _csr_linear_t(grad, values, crow, col, x.shape[-1]) if ctx.needs_input_grad[0] else None
    return gx, gv, None, None, None, None


_csr_linear.register_autograd(_backward, setup_context=_setup)


def csr_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, crow: torch.Tensor,
               col: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ W.T`` for the CSR weight ``W`` given by ``(crow, col, values)`` (int32 indices;
    ``indices``, the flat positions, only checked)."""
    return _csr_linear(x, values, indices, crow, col, out_features)


def time_kernels(layer: SparseLayer, kernels: tuple[str, ...], input_shape: tuple[int, ...], *,
                 repeats: int = 5, min_block_s: float = 0.005) -> dict[str, float]:
    """Seconds of one forward+backward of ``layer`` with each of ``kernels`` on a random input
    of ``input_shape``, timed in turn (round-robin, so a busy spell of the machine falls on all):
    per kernel, the fastest of ``repeats`` blocks of calls (each block at least ``min_block_s``
    long), per call -- the minimum, as noise from other work only adds time. The gradients it
    makes are dropped; the layer's kernel is restored."""
    saved = layer.kernel
    device = layer.values.device
    generator = torch.Generator(device=device).manual_seed(0)  # the global RNG is left alone
    x = torch.randn(input_shape, device=device, dtype=layer.values.dtype, generator=generator,
                    requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def once() -> None:
        out = layer(x)
        torch.autograd.grad(out, [x, *params], torch.ones_like(out))

    calls, best = {}, {k: float("inf") for k in kernels}
    try:
        for kernel in kernels:  # warm-up, and the size of a block
            layer.set_kernel(kernel)
            t0 = time.perf_counter()
            once()
            calls[kernel] = max(1, int(min_block_s / max(time.perf_counter() - t0, 1e-6)))
        for _ in range(repeats):
            for kernel in kernels:
                layer.set_kernel(kernel)
                t0 = time.perf_counter()
                for _ in range(calls[kernel]):
                    once()
                best[kernel] = min(best[kernel], (time.perf_counter() - t0) / calls[kernel])
    finally:
        layer.set_kernel(saved)
    return best


def time_kernel(layer: SparseLayer, kernel: str, input_shape: tuple[int, ...], *,
                repeats: int = 5, min_block_s: float = 0.005) -> float:
    """:func:`time_kernels` of one kernel."""
    return time_kernels(layer, (kernel,), input_shape, repeats=repeats,
                        min_block_s=min_block_s)[kernel]


def preferred_kernel(times: dict[str, float], margin: float = CSR_MARGIN) -> str:
    """The kernel to run given each one's seconds: ``"csr"`` only when it is faster than
    ``"dense"`` by more than ``margin`` (a fraction of dense's time), else ``"dense"``; with one
    of them only, that one."""
    if "dense" not in times:
        return min(times, key=lambda k: (times[k], k))
    csr = times.get("csr")
    return "csr" if csr is not None and csr < (1.0 - margin) * times["dense"] else "dense"


def kernel_choices() -> dict[tuple, tuple[str, dict[str, float]]]:
    """The choices made in this process: layer configuration -> (kernel, seconds per kernel)."""
    return dict(_CHOICES)


def clear_kernel_choices() -> None:
    """Forget the choices made in this process: the next layers are timed again."""
    _CHOICES.clear()


def choose_kernel(layer: SparseLayer, input_shape: tuple[int, ...], *, repeats: int = 5) -> str:
    """Set ``layer``'s kernel to the one :func:`preferred_kernel` picks from their times on this
    input shape (``layer.kernel_times`` keeps the seconds of each); returns the kernel chosen.
    Each layer configuration is timed once per process: a later layer of the same
    configuration gets the same kernel (see the module's docstring)."""
    kernels = KERNELS if isinstance(layer, SparseLinear) else ("dense",)
    if not isinstance(layer, SparseLinear):  # one kernel: timed for the report only
        times = time_kernels(layer, kernels, input_shape, repeats=repeats)
        best = "dense"
    else:
        values = layer.values
        key = (type(layer).__name__, tuple(layer.weight_shape), int(layer.nnz),
               layer.bias is not None, tuple(input_shape), values.dtype, values.device,
               values.requires_grad, kernels)
        if key not in _CHOICES:
            times = time_kernels(layer, kernels, input_shape, repeats=repeats)
            _CHOICES[key] = (preferred_kernel(times), dict(times))
        best, times = _CHOICES[key]
        times = dict(times)
    layer.set_kernel(best)
    layer.kernel_times = times
    log.info("kernel for %s on %s: %s (%s)", layer.weight_shape, input_shape, best,
             ", ".join(f"{k} {t * 1e3:.2f} ms" for k, t in times.items()))
    return best
