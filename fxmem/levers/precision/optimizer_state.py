"""Optimizer state in fewer bits: :func:`low_bit_optimizer` and fxmem's bf16-state optimizers.

``fxmem.low_bit_optimizer(opt, bits=8)`` returns a new optimizer over ``opt``'s param groups, with
their hyper-parameters, whose state (Adam's two moments, SGD's momentum) takes fewer bytes:

- ``bits=8`` / ``bits=4``: torchao's blockwise-quantised optimizers (``torchao.optim.AdamW8bit``,
  ``Adam8bit``, ``AdamW4bit``, ``Adam4bit``; https://arxiv.org/abs/2110.02861, as bitsandbytes).
  Each moment of a parameter with at least 4096 elements, divisible by the block size (256 for
  8 bits, 128 for 4), is held as 8-bit (4-bit) codes into a 256 (16)-value dynamic map with one
  fp32 scale per block: 8 bits hold ``n + 4 n / 256 + 1024`` bytes instead of ``4 n``, 4 bits
  ``n / 2 + 4 n / 128 + 64``. Smaller parameters keep their moments in their own dtype. Their
  ``step()`` compiles one kernel per parameter shape with ``torch.compile`` (seconds per shape on
  a CPU the first time) and dequantises into temporaries that the memory model counts. Needs
  ``pip install 'fxmem[lowbit]'`` (torchao >= 0.18; it installs beside torch and runs on CPU and
  CUDA). Not for ``amsgrad=True`` (torchao 0.18's step fails on its quantised ``max_exp_avg_sq``)
  or SGD (torchao has no low-bit SGD).
- ``bits="bf16"``: :class:`BF16StateAdam` / :class:`BF16StateSGD`, fxmem's own: the moments (the
  momentum buffer) are bfloat16 tensors like the parameter, half of fp32's bytes for every
  parameter. ``step()`` runs eagerly, one parameter at a time, in fp32: the moments are read into
  fp32 temporaries, updated as ``torch.optim.Adam``/``AdamW``/``SGD`` update them, the parameter
  is updated from them, and they are written back to bf16 with *stochastic rounding* (round up
  with probability equal to the discarded fraction, so the stored moment is unbiased: with
  round-to-nearest an ``exp_avg_sq`` update smaller than bf16's half-spacing, e.g.
  ``(1 - 0.999) * v``, would be lost every step and ``v`` could never decrease). The rounding
  draws 16 random bits per element from the default generator of the parameter's device, so a
  run with this optimizer draws different numbers after the first step than one with fp32 state.

The parameters stay as they are (fp32 master weights); only the optimizer state is smaller. The
conversion is lossy (opt-in, like the precision lever): over the first steps the updates equal
fp32 Adam's to within the state's rounding (the tests bound the losses' gap on a small model).

Why a new optimizer and not a silent swap: the user's loop calls ``step()`` on the object it
holds, so ``fxmem.optimize`` cannot replace it; when ``"precision"`` is allowed and no plan fits,
the :class:`~fxmem.budget.BudgetError` says how many bytes the conversion would save
(:func:`low_bit_hint`). Convert before the first ``step()``; learning-rate schedulers are made on
the returned optimizer (torchao's keep ``lr`` as a tensor: a scheduler must ``fill_`` it).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import numbers
from collections.abc import Iterable

import torch

__all__ = ["low_bit_optimizer", "low_bit_hint", "BF16StateAdam", "BF16StateSGD", "BITS",
           "INSTALL_HINT"]

log = logging.getLogger(__name__)

BITS = (8, 4, "bf16")
INSTALL_HINT = "pip install 'fxmem[lowbit]' (torchao>=0.18)"
# torch's implementation choices: they do not carry over (the new optimizer has its own step)
_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable", "maximize",
                        "decoupled_weight_decay")


def _torchao_optim():
    """``torchao.optim``, imported on first use; an ImportError that says what to install."""
    try:
        return importlib.import_module("torchao.optim")
    except ImportError as exc:
        raise ImportError(f"8- and 4-bit optimizer state uses torchao's low-bit optimizers: "
                          f"{INSTALL_HINT}; bits='bf16' needs nothing more ({exc})") from exc


# ------------------------------------------------------------------------ bf16 state optimizers

def _round_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst`` (bf16) <- ``src`` (fp32) with stochastic rounding; ``src`` is clobbered.

    Adding 16 random bits below bf16's mantissa and truncating rounds the magnitude up with
    probability equal to the dropped fraction (fp32 and bf16 share the sign and exponent bits; a
    carry into the exponent is the correct rounding). One int32 temporary of ``src``'s size."""
    bits = src.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    bits.add_(noise)
    del noise
    bits.bitwise_and_(-65536)  # 0xFFFF0000: keep sign, exponent and bf16's 7 mantissa bits
    dst.copy_(src)  # exact: src is representable in bf16 now


def _fp32_grad(p: torch.Tensor) -> torch.Tensor:
    grad = p.grad
    if grad.is_sparse:
        raise RuntimeError("fxmem's bf16-state optimizers do not support sparse gradients")
    return grad if grad.dtype == torch.float32 else grad.float()


def _fp32_param(p: torch.Tensor) -> torch.Tensor:
    """The parameter itself when fp32, else an fp32 copy that the caller writes back."""
    return p if p.dtype == torch.float32 else p.float()


def _closure_loss(closure):
    """The loss ``closure`` recomputes (with gradients), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _check_numbers(group: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        _check_number(key, group[key])


def _check_number(name: str, value) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(v, torch.Tensor) or not isinstance(v, numbers.Real):
            raise TypeError(f"fxmem's bf16-state optimizers take {name} as Python numbers, "
                            f"got {value!r}")


class BF16StateAdam(torch.optim.Optimizer):
    """Adam (``decoupled_weight_decay=False``) or AdamW (``True``) with ``exp_avg``,
    ``exp_avg_sq`` and, with ``amsgrad``, ``max_exp_avg_sq`` held in bfloat16 (module docstring).

    Hyper-parameters and update rule are ``torch.optim.Adam``'s (``maximize`` is not supported);
    each parameter's update is computed in fp32 and its moments stored back with stochastic
    rounding. ``state["step"]`` is a Python int."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 decoupled_weight_decay: bool = False) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid beta parameters: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            _check_numbers(group, ("lr", "betas", "eps", "weight_decay"))
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"]
                                                         else [])
                    for name in names:
                        state[name] = torch.zeros_like(p, dtype=torch.bfloat16,
                                                       memory_format=torch.preserve_format)
                state["step"] += 1
                _adam_update(p, state, group)
        return loss


def _adam_update(p: torch.Tensor, state: dict, group: dict) -> None:
    # One function per parameter: its fp32 temporaries are freed when it returns (the memory
    # model, fxmem.memory.low_bit_optimizer, mirrors these statements).
    grad = _fp32_grad(p)  # a copy only for a non-fp32 parameter
    param = _fp32_param(p)  # likewise: mixed-dtype in-place ops would allocate fp32 scratch
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    if wd != 0:
        if group["decoupled_weight_decay"]:
            param.mul_(1 - lr * wd)
        else:
            grad = grad.add(param, alpha=wd)
    exp_avg = state["exp_avg"].float()
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"].float()
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = state["step"]
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    max_exp_avg_sq = None
    if group["amsgrad"]:
        max_exp_avg_sq = state["max_exp_avg_sq"].float()
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = max_exp_avg_sq.sqrt()
    else:
        denom = exp_avg_sq.sqrt()
    denom.div_(bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    del denom
    if param is not p:
        p.copy_(param)
        del param
    _round_into(state["exp_avg"], exp_avg)
    del exp_avg
    _round_into(state["exp_avg_sq"], exp_avg_sq)
    del exp_avg_sq
    if max_exp_avg_sq is not None:
        _round_into(state["max_exp_avg_sq"], max_exp_avg_sq)


class BF16StateSGD(torch.optim.Optimizer):
    """SGD with momentum whose ``momentum_buffer`` is bfloat16 (module docstring).

    Hyper-parameters and update rule are ``torch.optim.SGD``'s with ``momentum > 0``
    (``maximize`` is not supported); the update is computed in fp32 and the buffer stored back
    with stochastic rounding."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not momentum > 0.0:
            raise ValueError(f"BF16StateSGD holds SGD's momentum buffer: momentum must be > 0, "
                             f"got {momentum} (SGD without momentum holds no state)")
        if nesterov and dampening != 0:
            raise ValueError("Nesterov momentum requires zero dampening")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            _check_numbers(group, ("lr", "momentum", "dampening", "weight_decay"))
            if not group["momentum"] > 0:
                raise ValueError(f"BF16StateSGD: a param group has momentum="
                                 f"{group['momentum']}; it must be > 0")
            for p in group["params"]:
                if p.grad is not None:
                    _sgd_update(p, self.state[p], group)
        return loss


def _sgd_update(p: torch.Tensor, state: dict, group: dict) -> None:
    grad = _fp32_grad(p)
    param = _fp32_param(p)
    momentum, wd = group["momentum"], group["weight_decay"]
    if wd != 0:
        grad = grad.add(param, alpha=wd)
    buf = state.get("momentum_buffer")
    if buf is None:  # as torch.optim.SGD: the first buffer is the gradient itself
        state["momentum_buffer"] = buf = torch.empty_like(p, dtype=torch.bfloat16,
                                                          memory_format=torch.preserve_format)
        momentum_f32 = grad.clone()
    else:
        momentum_f32 = buf.float()
        momentum_f32.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
    update = grad.add(momentum_f32, alpha=momentum) if group["nesterov"] else momentum_f32
    param.add_(update, alpha=-group["lr"])
    del update
    if param is not p:
        p.copy_(param)
        del param
    _round_into(buf, momentum_f32)


# -------------------------------------------------------------------------------- conversion

def _source_kind(optimizer) -> str:
    """"Adam", "AdamW" or "SGD" for an optimizer :func:`low_bit_optimizer` converts."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"low_bit_optimizer takes a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    cls = type(optimizer)
    if cls is torch.optim.AdamW:
        return "AdamW"
    if cls is torch.optim.Adam:
        decoupled = {bool(g.get("decoupled_weight_decay", False)) for g in optimizer.param_groups}
        if len(decoupled) > 1:
            raise NotImplementedError("low_bit_optimizer: an Adam whose param groups mix "
                                      "decoupled_weight_decay=True and False")
        return "AdamW" if decoupled == {True} else "Adam"
    if cls is torch.optim.SGD:
        return "SGD"
    raise NotImplementedError(
        f"low_bit_optimizer converts torch.optim.Adam, AdamW (bits=8, 4 or 'bf16') and SGD with "
        f"momentum (bits='bf16'), exactly these classes; got {cls.__module__}.{cls.__qualname__}")


def _check_groups(kind: str, optimizer, bits) -> None:
    for i, g in enumerate(optimizer.param_groups):
        for key in ("maximize", "differentiable"):
            if g.get(key):
                raise NotImplementedError(f"low_bit_optimizer: param group {i} has {key}=True, "
                                          "which the low-bit optimizers do not support")
        if kind == "SGD" and g["momentum"] == 0:
            raise ValueError(f"low_bit_optimizer: SGD param group {i} has momentum=0: it holds "
                             "no state, there is nothing to store in fewer bits")
        if kind != "SGD" and bits != "bf16" and g["amsgrad"]:
            raise NotImplementedError(
                f"low_bit_optimizer: param group {i} has amsgrad=True; torchao 0.18's {bits}-bit "
                "step fails on its quantised max_exp_avg_sq (aten.maximum is not implemented "
                "for it); use bits='bf16'")
        betas = g.get("betas", ())
        if any(isinstance(b, torch.Tensor) for b in betas):
            raise TypeError(f"low_bit_optimizer: param group {i} has Tensor betas; pass floats")
        if bits == "bf16":
            for key in ("lr", "weight_decay", "momentum", "dampening", "eps"):
                if isinstance(g.get(key), torch.Tensor):
                    raise TypeError(f"low_bit_optimizer: param group {i} has a Tensor {key}; "
                                    "bits='bf16' takes Python numbers")


def _new_groups(optimizer) -> list[dict]:
    """The param groups with their hyper-parameters and the user's own keys (e.g. a name or a
    scheduler's ``initial_lr``), without torch's implementation flags."""
    return [{k: v for k, v in g.items() if k not in _IMPLEMENTATION_KEYS}
            for g in optimizer.param_groups]


def _convert(optimizer, bits, block_size: int | None) -> torch.optim.Optimizer:
    kind = _source_kind(optimizer)
    if bits not in BITS or isinstance(bits, bool):
        raise ValueError(f"low_bit_optimizer: bits must be 8, 4 or 'bf16', got {bits!r}")
    if block_size is not None and (bits == "bf16" or not isinstance(block_size, int)
                                   or block_size <= 0):
        raise ValueError(f"low_bit_optimizer: block_size (a positive int) is for bits=8 or 4, "
                         f"got block_size={block_size!r} with bits={bits!r}")
    if kind == "SGD" and bits != "bf16":
        raise NotImplementedError(f"low_bit_optimizer: SGD's momentum in {bits} bits: torchao "
                                  "has no low-bit SGD; bits='bf16' holds it in bfloat16")
    _check_groups(kind, optimizer, bits)
    groups, d = _new_groups(optimizer), optimizer.defaults
    if bits == "bf16":
        if kind == "SGD":
            # every group carries its own momentum (> 0, checked); the default is only a default
            return BF16StateSGD(groups, lr=d["lr"], momentum=d["momentum"] or 0.9,
                                dampening=d["dampening"], weight_decay=d["weight_decay"],
                                nesterov=d["nesterov"])
        for g in groups:
            g["decoupled_weight_decay"] = kind == "AdamW"
        return BF16StateAdam(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                             weight_decay=d["weight_decay"], amsgrad=d["amsgrad"],
                             decoupled_weight_decay=kind == "AdamW")
    ao = _torchao_optim()
    cls = getattr(ao, f"{kind}{bits}bit")
    extra = {"block_size": block_size} if block_size is not None else {}
    return cls(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"],
               weight_decay=d["weight_decay"], amsgrad=d["amsgrad"], **extra)


def low_bit_optimizer(optimizer: torch.optim.Optimizer, bits: int | str = 8, *,
                      block_size: int | None = None) -> torch.optim.Optimizer:
    """A new optimizer over ``optimizer``'s param groups, with their hyper-parameters, whose
    state is held in fewer bits (lossy; see the module docstring).

    ``bits``: 8 or 4 (torchao's ``Adam8bit``/``AdamW8bit``/``Adam4bit``/``AdamW4bit``, blockwise
    quantised, ``block_size`` defaulting to torchao's 256 / 128) or ``"bf16"``
    (:class:`BF16StateAdam`, :class:`BF16StateSGD`). Converts ``torch.optim.Adam`` and ``AdamW``
    (``Adam(decoupled_weight_decay=True)`` becomes AdamW) with any bits, and ``torch.optim.SGD``
    with momentum with ``bits="bf16"``. Raises ``NotImplementedError`` for other optimizers,
    ``maximize=True``, ``differentiable=True`` and torchao with ``amsgrad=True``; ``ValueError``
    for an optimizer that has stepped already (its state would be lost: convert before the first
    ``step()``); ``ImportError`` naming the package when torchao is missing.

    Use the returned optimizer in the loop (and give it to ``fxmem.optimize(optimizer=...)``,
    whose memory model counts its state's real bytes)::

        opt = fxmem.low_bit_optimizer(torch.optim.AdamW(model.parameters(), lr=3e-4), bits=8)
    """
    if optimizer_has_state(optimizer):
        raise ValueError("low_bit_optimizer: the optimizer has stepped already; its state would "
                         "be lost -- convert it before the first step()")
    return _convert(optimizer, bits, block_size)


def optimizer_has_state(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Optimizer) and any(
        len(s) for s in optimizer.state.values())


# ------------------------------------------------------------------------ the BudgetError hint

def low_bit_hint(optimizer, params: Iterable[torch.Tensor] | None = None) -> str | None:
    """One line for a :class:`~fxmem.budget.BudgetError`: how many bytes of optimizer state
    :func:`low_bit_optimizer` would save, by the memory model that priced the plan (predicted
    without building the new optimizer, so without torchao), or None when ``optimizer`` is not
    one it converts. ``params``: those that get a gradient (default: those requiring one)."""
    from fxmem.budget import format_bytes
    from fxmem.memory.low_bit_optimizer import converted_memory
    from fxmem.memory.optimizer import optimizer_memory

    try:
        kind = _source_kind(optimizer)
    except (TypeError, NotImplementedError):
        return None
    with_grad = ({id(p) for p in params} if params is not None else
                 {id(p) for g in optimizer.param_groups for p in g["params"] if p.requires_grad})

    def has_grad(p):
        return id(p) in with_grad

    now = optimizer_memory(optimizer, has_grad=has_grad).state_bytes
    options = []
    for bits in ((8, 4, "bf16") if kind != "SGD" else ("bf16",)):
        try:
            _check_groups(kind, optimizer, bits)
            state = converted_memory(optimizer, bits, has_grad).state_bytes
        except (NotImplementedError, ValueError, TypeError):
            continue
        if state < now:
            options.append(f"bits={bits!r}: {format_bytes(state)} ({format_bytes(now - state)} "
                           f"less)")
    if not options:
        return None
    text = (f"Optimizer state in fewer bits (lossy, allowed by 'precision'; fxmem cannot swap "
            f"the optimizer your loop steps): opt = fxmem.low_bit_optimizer(opt, bits=...) "
            f"would hold, instead of {format_bytes(now)}, " + "; ".join(options))
    if kind != "SGD" and importlib.util.find_spec("torchao") is None:
        text += f" (bits=8 and 4 need {INSTALL_HINT})"
    return text
