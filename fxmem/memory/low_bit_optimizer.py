"""The device memory of optimizers whose state is held in fewer bits: torchao's blockwise-quantised
Adam/AdamW (8-bit, 4-bit, fp8) and fxmem's bf16-state Adam/SGD
(:mod:`fxmem.levers.precision.optimizer_state`). :func:`fxmem.memory.optimizer.optimizer_memory`
hands them here; like it, this uses only the parameters' ``numel``, ``element_size`` and device
and the param groups, so it predicts the state before the first ``step()`` creates it.

**torchao 0.18** (``torchao/optim/adam.py``, ``subclass_8bit.py``, ``subclass_4bit.py``,
``subclass_fp8.py``). A parameter of ``n >= 4096`` elements with ``n % block_size == 0`` gets
each moment quantised, as ``codes`` + one fp32 ``scale`` per block + a copy of the code map:

=========  =================  ===================  ============
state      codes              scale                map (qmap)
=========  =================  ===================  ============
8-bit      ``n`` uint8        ``4 n / block``      256 fp32: 1024 B
4-bit      ``n / 2`` uint8    ``4 n / block``      16 fp32: 64 B
fp8        ``n`` e4m3         ``4 n / block``      none
=========  =================  ===================  ============

Other parameters get ``torch.zeros_like(p)`` moments. Each parameter's ``step`` is a CPU float
tensor and each group's ``lr`` a CPU fp32 tensor (4 bytes each, on the CPU only).

Its ``step()`` runs ``torch.compile(single_param_adam)`` for one parameter at a time; the
compiled kernel of a quantised parameter allocates buffers that it frees on return, so the step's
temporaries are those of the largest quantised parameter. They are Inductor's choices, read from
its generated code (``TORCH_LOGS=output_code``) and measured with the profiler, on the CPU with
torch 2.13: the normalised fp32 moments and the per-block scales before quantisation (8-bit:
``2 x 4n + 2 x 4n/block``), plus, for 4 bits, the unpacked codes and int64 indices (AdamW:
``26 n + 8 n/block``; Adam, whose kernel Inductor fuses differently: ``12 n + 8 n/block``); for
fp8, the scales, and with Adam up to ``2 n`` more (on some shapes 0: the larger is modelled).
Unquantised parameters' kernels allocate nothing. With CUDA, Triton's kernels may realise fewer
buffers: these numbers are not measured there (fxmem's GPU margin covers Inductor's differences).

**fxmem's bf16 state** (``BF16StateAdam``, ``BF16StateSGD``): each moment (momentum buffer) is a
bf16 tensor like the parameter, ``2 n`` bytes; ``step`` is a Python int. Their ``step()`` mirrors
below statement by statement (:func:`_bf16_adam_peak`, :func:`_bf16_sgd_peak`).
"""

from __future__ import annotations

import torch

from fxmem.memory.optimizer import OptimizerMemory, _check_params, _pick_device, _Trace

__all__ = ["low_bit_memory", "converted_memory", "TORCHAO_OPTIMIZERS", "torchao_state_bytes"]

# class name in torchao.optim -> (label, state format)
TORCHAO_OPTIMIZERS = {
    "Adam8bit": ("Adam", "8bit"), "AdamW8bit": ("AdamW", "8bit"),
    "Adam4bit": ("Adam", "4bit"), "AdamW4bit": ("AdamW", "4bit"),
    "AdamFp8": ("Adam", "fp8"), "AdamWFp8": ("AdamW", "fp8"),
}
_QMAP_BYTES = {"8bit": 256 * 4, "4bit": 16 * 4, "fp8": 0}
_MIN_QUANTISED = 4096  # torchao follows bitsandbytes: smaller tensors are not quantised


def _is_torchao(optimizer) -> str | None:
    cls = type(optimizer)
    if cls.__module__.startswith("torchao.optim") and cls.__name__ in TORCHAO_OPTIMIZERS:
        return cls.__name__
    return None


def _quantised(n: int, block_size) -> bool:
    # torchao's _AdamBase._new_buffer
    return n >= _MIN_QUANTISED and n % block_size == 0


def torchao_state_bytes(n: int, element_size: int, fmt: str, block_size: int) -> int:
    """Bytes of one moment of an ``n``-element parameter in a torchao low-bit optimizer."""
    if not _quantised(n, block_size):
        return n * element_size
    codes = n // 2 if fmt == "4bit" else n
    return codes + 4 * (n // block_size) + _QMAP_BYTES[fmt]


def _torchao_step_peak(n: int, label: str, fmt: str, block_size: int) -> int:
    """Inductor's buffers in one quantised parameter's compiled step (module docstring)."""
    scales = 2 * 4 * (n // block_size)
    if fmt == "8bit":
        return 8 * n + scales
    if fmt == "4bit":
        return (26 if label == "AdamW" else 12) * n + scales
    return (2 * n if label == "Adam" else 0) + scales


def _bf16_adam_peak(n: int, fp32_param: bool, g: dict) -> int:
    """Mirrors optimizer_state._adam_update for one parameter (its temporaries die on return)."""
    t, f32 = _Trace(), 4 * n
    grad = 0 if fp32_param else t.new(f32)  # _fp32_grad: p.grad.float()
    param = 0 if fp32_param else t.new(f32)  # _fp32_param: p.float()
    if g["weight_decay"] != 0 and not g["decoupled_weight_decay"]:
        t.new(f32)  # grad = grad.add(param, alpha=wd)
        t.free(grad)
    t.new(f32)  # exp_avg = state["exp_avg"].float()
    t.new(f32)  # exp_avg_sq
    if g["amsgrad"]:
        t.new(f32)  # max_exp_avg_sq
    t.free(t.new(f32))  # denom = (...).sqrt(), in place after; del denom
    t.free(param)  # p.copy_(param); del param
    t.free(t.new(f32))  # _round_into: the int32 noise of the first moment stored
    return t.peak


def _bf16_sgd_peak(n: int, fp32_param: bool, g: dict) -> int:
    """Mirrors optimizer_state._sgd_update in the steady state (the buffer exists)."""
    t, f32 = _Trace(), 4 * n
    grad = 0 if fp32_param else t.new(f32)
    param = 0 if fp32_param else t.new(f32)
    if g["weight_decay"] != 0:
        t.new(f32)  # grad = grad.add(param, alpha=wd)
        t.free(grad)
    t.new(f32)  # momentum_f32 = buf.float()
    if g["nesterov"]:
        t.free(t.new(f32))  # update = grad.add(momentum_f32); del update
    t.free(param)  # p.copy_(param); del param
    t.free(t.new(f32))  # _round_into's noise
    return t.peak


def _bf16_kind(optimizer) -> str | None:
    from fxmem.levers.precision.optimizer_state import BF16StateAdam, BF16StateSGD

    cls = type(optimizer)
    return "Adam" if cls is BF16StateAdam else "SGD" if cls is BF16StateSGD else None


def low_bit_memory(optimizer, has_grad, device) -> OptimizerMemory | None:
    """The :class:`OptimizerMemory` of a low-bit optimizer, or None for any other."""
    torchao = _is_torchao(optimizer)
    if torchao is not None:
        label, fmt = TORCHAO_OPTIMIZERS[torchao]
        return _memory(f"torchao {torchao}", optimizer.param_groups, has_grad, device,
                       torchao=(label, fmt, optimizer.block_size))
    bf16 = _bf16_kind(optimizer)
    if bf16 is None:
        return None
    decoupled = bf16 == "Adam" and optimizer.defaults["decoupled_weight_decay"]
    return _memory(f"fxmem BF16State{bf16}" + (" (AdamW)" if decoupled else ""),
                   optimizer.param_groups, has_grad, device, bf16=bf16)


def converted_memory(optimizer, bits, has_grad, device=None) -> OptimizerMemory:
    """What ``fxmem.low_bit_optimizer(optimizer, bits)`` would hold, predicted without building
    it (so without torchao): ``optimizer`` is a ``torch.optim`` Adam, AdamW or SGD."""
    from fxmem.levers.precision.optimizer_state import _source_kind

    kind = _source_kind(optimizer)
    if bits == "bf16":
        groups = [dict(g, decoupled_weight_decay=kind == "AdamW") for g in optimizer.param_groups]
        name = "fxmem BF16StateSGD" if kind == "SGD" else "fxmem BF16StateAdam" + (
            " (AdamW)" if kind == "AdamW" else "")
        return _memory(name, groups, has_grad, device, bf16="SGD" if kind == "SGD" else "Adam")
    if kind == "SGD":
        raise NotImplementedError("torchao has no low-bit SGD")
    fmt = {8: "8bit", 4: "4bit"}[bits]
    return _memory(f"torchao {kind}{bits}bit", optimizer.param_groups, has_grad, device,
                   torchao=(kind, fmt, _DEFAULT_BLOCK[fmt]))


_DEFAULT_BLOCK = {"8bit": 256, "4bit": 128, "fp8": 256}  # torchao's constructors' defaults


def _memory(name: str, groups, has_grad, device, *, torchao: tuple | None = None,
            bf16: str | None = None) -> OptimizerMemory:
    all_params = [p for g in groups for p in g["params"]]
    dev = _pick_device(all_params, device)
    on_cpu = dev.type == "cpu"
    state = peak = 0
    for g in groups:
        if torchao and on_cpu:
            state += 4  # the group's lr, a CPU fp32 tensor since construction
        params = [p for p in g["params"] if has_grad(p)]
        _check_params(params)
        local = [p for p in params if p.device.type == "meta" or p.device == dev]
        if torchao:
            label, fmt, bs = torchao
            if g["amsgrad"] and any(_quantised(p.numel(), bs) for p in params):
                raise NotImplementedError(
                    f"optimizer_memory: {name} with amsgrad=True is not modelled (torchao "
                    "0.18's step fails on a quantised max_exp_avg_sq)")
            moments = 3 if g["amsgrad"] else 2
            if on_cpu:  # each parameter's `step`: torch.tensor(0.0), default dtype, on the CPU
                state += torch.finfo(torch.get_default_dtype()).bits // 8 * len(params)
            for p in local:
                n = p.numel()
                state += moments * torchao_state_bytes(n, p.element_size(), fmt, bs)
                if _quantised(n, bs):
                    peak = max(peak, _torchao_step_peak(n, label, fmt, bs))
        else:
            moments = 1 if bf16 == "SGD" else (3 if g["amsgrad"] else 2)
            step = _bf16_sgd_peak if bf16 == "SGD" else _bf16_adam_peak
            for p in local:
                state += moments * 2 * p.numel()
                peak = max(peak, step(p.numel(), p.dtype == torch.float32, g))
    return OptimizerMemory(name, state_bytes=state, step_peak_bytes=peak)
