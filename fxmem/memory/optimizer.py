"""The device memory a ``torch.optim`` optimizer holds (its state) and allocates in ``step()``.

The model mirrors, statement by statement, the Python code of ``torch.optim`` in torch 2.13
(``adam.py``, ``adamw.py``, ``sgd.py``) for SGD, Adam and AdamW in their single-tensor, foreach
and fused variants, so that it can run without running the optimizer and without allocating:
parameters may live on the ``meta`` device.  It uses only ``numel``, ``element_size``, ``dtype``
and ``device`` of the parameters and the hyper-parameters of the param groups.  A ``DTensor``
parameter (FSDP2's) counts at its local shard: the state and temporaries on this process.

What the mirror tracks is which temporaries each Python name keeps alive.  Two consequences that a
"worst single parameter" rule misses:

* single-tensor Adam keeps the previous parameter's ``denom`` bound until the next parameter's
  ``denom`` is computed, so the peak is ``prev denom + grad copy + sqrt + quotient``; single-tensor
  SGD keeps the previous ``grad`` temporary while ``-grads[i]`` is computed (``maximize``);
* foreach Adam keeps the previous (device, dtype) group's ``exp_avg_sq_sqrt`` list alive while the
  next group allocates its lists.  torch orders the groups by a C++ hash map; the model asks torch
  for that order, except for meta params modelled on another device with three or more groups,
  where it takes the two largest groups as adjacent (an upper bound).

Scalar wrapper tensors (a few bytes each, on the CPU) and allocator rounding are not modelled.
Optimizers with low-bit state (torchao's, fxmem's bf16) are modelled in
:mod:`fxmem.memory.low_bit_optimizer`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from fxmem.graph import torch_compat

__all__ = ["OptimizerMemory", "optimizer_memory", "SUPPORTED_OPTIMIZERS"]

logger = logging.getLogger(__name__)

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


@dataclass(frozen=True)
class OptimizerMemory:
    """Optimizer memory on one device, in bytes.

    ``state_bytes``: optimizer state resident on the device in the steady state (after >= 1 step):
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, and the ``step`` tensors
    when they live on that device (CPU unless fused or capturable).
    ``step_peak_bytes``: the most bytes of temporaries alive at once during ``step()``, above the
    resident state, parameters and gradients.
    """

    name: str
    state_bytes: int
    step_peak_bytes: int


class _Trace:
    """Live temporaries bound to Python names, with the running and peak byte counts."""

    def __init__(self) -> None:
        self.cur = 0
        self.peak = 0
        self.names: dict[str, int] = {}

    def new(self, nbytes: int) -> int:
        """Allocate a temporary (an expression's result) of ``nbytes``; return it."""
        self.cur += nbytes
        self.peak = max(self.peak, self.cur)
        return nbytes

    def free(self, nbytes: int) -> None:
        """Drop an unnamed temporary (an intermediate consumed by the next operation)."""
        self.cur -= nbytes

    def bind(self, name: str, nbytes: int = 0) -> None:
        """``name = <temporary of nbytes>`` (0: not a temporary); the old value is released."""
        old = self.names.get(name, 0)
        self.names[name] = nbytes
        self.cur -= old


def _sgd_single(t: _Trace, sizes: list[int], g: dict) -> None:
    # torch/optim/sgd.py::_single_tensor_sgd, steady state (every momentum buffer exists).
    for n in sizes:
        t.bind("grad", t.new(n) if g["maximize"] else 0)  # grad = -grads[i]
        if g["weight_decay"] != 0:
            t.bind("grad", t.new(n))  # grad = grad.add(param, alpha=wd): a copy
        if g["momentum"] != 0:  # buf.mul_(momentum).add_(grad): in place
            if g["nesterov"]:
                t.bind("grad", t.new(n))  # grad = grad.add(buf, alpha=momentum)
            else:
                t.bind("grad", 0)  # grad = buf
        # param.add_(grad, alpha=-lr): in place


def _sgd_foreach(t: _Trace, groups: list[int], g: dict) -> None:
    # torch/optim/sgd.py::_multi_tensor_sgd; `groups` holds each (device, dtype) group's bytes.
    for s in groups:
        t.bind("device_grads", 0)  # device_grads = cast(..., device_grads_)
        if g["maximize"]:
            t.bind("device_grads", t.new(s))  # torch._foreach_neg(device_grads)
        if g["weight_decay"] != 0 and not g["maximize"]:
            t.bind("device_grads", t.new(s))  # torch._foreach_add (maximize: _foreach_add_)
        if g["momentum"] != 0 and not g["nesterov"]:
            t.bind("device_grads", 0)  # device_grads = bufs
        # nesterov: torch._foreach_add_(device_grads, bufs) in place -- on p.grad itself when
        # neither maximize nor weight_decay made a copy.  Then _foreach_add_(params): in place.


def _adam_single(t: _Trace, sizes: list[int], g: dict) -> None:
    # torch/optim/adam.py::_single_tensor_adam, capturable=False, differentiable=False.
    for n in sizes:
        t.bind("grad", t.new(n) if g["maximize"] else 0)  # grad = -grads[i]
        if g["weight_decay"] != 0 and not g["decoupled_weight_decay"]:
            t.bind("grad", t.new(n))  # grad = grad.add(param, alpha=wd); decoupled: param.mul_
        # lerp_, mul_().addcmul_(), torch.maximum(..., out=max_exp_avg_sqs[i]): in place
        sqrt = t.new(n)  # exp_avg_sq.sqrt() (or max_exp_avg_sqs[i].sqrt())
        quotient = t.new(n)  # ... / bias_correction2_sqrt
        t.free(sqrt)
        t.bind("denom", quotient)  # .add_(eps) in place; the previous denom is released now
        # param.addcdiv_(exp_avg, denom): in place


def _adam_foreach(t: _Trace, groups: list[int], g: dict) -> None:
    # torch/optim/adam.py::_multi_tensor_adam, capturable=False.
    for s in groups:
        t.bind("device_grads", 0)
        if g["maximize"]:
            t.bind("device_grads", t.new(s))  # torch._foreach_neg(device_grads)
        if g["weight_decay"] != 0 and not g["decoupled_weight_decay"] and not g["maximize"]:
            t.bind("device_grads", t.new(s))  # torch._foreach_add (maximize: _foreach_add_)
        # _foreach_lerp_, _foreach_mul_, _foreach_addcmul_, _foreach_maximum_: in place
        t.bind("device_grads", 0)  # del device_grads, scaled_device_grads
        t.bind("exp_avg_sq_sqrt", t.new(s))  # torch._foreach_sqrt: the previous group's is
        # released only now.  _foreach_div_, _foreach_add_, _foreach_addcdiv_: in place


def _fused(t: _Trace, groups: list[int], g: dict) -> None:
    # torch._fused_sgd_ / _fused_adam_ / _fused_adamw_ update in place; no temporaries.
    pass


_IMPLS = {
    ("SGD", "single-tensor"): _sgd_single,
    ("SGD", "foreach"): _sgd_foreach,
    ("SGD", "fused"): _fused,
    ("Adam", "single-tensor"): _adam_single,
    ("Adam", "foreach"): _adam_foreach,
    ("Adam", "fused"): _fused,
}


def _default_foreach(device_types: list[str], params: list[torch.Tensor]) -> bool:
    # Mirrors torch.optim.optimizer._default_to_fused_or_foreach(params, differentiable=False,
    # use_fused=False) with each parameter's device type replaced by the modelled one.
    supported = torch_compat.FOREACH_SUPPORTED_DEVICES()()
    supported_types = torch_compat.FOREACH_SUPPORTED_TYPES()
    return all(type(p) in supported_types and dt in supported
               for p, dt in zip(params, device_types))


def _variant(kind: str, g: dict, device_types: list[str], params: list[torch.Tensor]) -> str:
    foreach, fused = g.get("foreach"), g.get("fused")
    if foreach is None and fused is None:  # as in adam() and sgd(): only when both are None
        foreach, fused = _default_foreach(device_types, params), False
    if kind == "Adam" and fused:  # adam(): fused wins over foreach
        return "fused"
    if foreach:  # sgd(): foreach wins over fused (the constructors reject both True)
        return "foreach"
    return "fused" if fused else "single-tensor"


def _check_group(kind: str, g: dict, variant: str) -> None:
    if g.get("differentiable"):
        raise NotImplementedError(
            "optimizer_memory: differentiable=True is not modelled (its step clones tensors and "
            "builds an autograd graph)"
        )
    if variant == "fused":
        return
    if kind == "Adam" and g.get("capturable"):
        raise NotImplementedError(
            "optimizer_memory: Adam/AdamW with capturable=True and fused=False is not modelled; "
            "use capturable=False or fused=True"
        )
    for key in ("lr", "weight_decay", "momentum", "dampening", "betas"):
        values = g.get(key, ())
        if any(isinstance(v, torch.Tensor) for v in (values if key == "betas" else (values,))):
            raise NotImplementedError(
                f"optimizer_memory: a Tensor {key!r} is not modelled for the {variant} "
                f"implementation; pass a float or use fused=True"
            )


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> tuple[str, str]:
    cls = type(optimizer)
    if cls is torch.optim.SGD:
        return "SGD", "SGD"
    if cls is torch.optim.AdamW:
        return "Adam", "AdamW"
    if cls is torch.optim.Adam:
        return "Adam", "Adam"
    names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED_OPTIMIZERS)
    raise NotImplementedError(
        f"optimizer_memory models only {names} (exactly these classes, not subclasses, whose step "
        f"cannot be vouched for), torchao's low-bit Adam/AdamW and fxmem's bf16-state optimizers "
        f"(fxmem.low_bit_optimizer); got {cls.__module__}.{cls.__qualname__}"
    )


def _pick_device(params: list[torch.Tensor], device: torch.device | str | None) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type != "meta" and dev.index is None:
            kinds = {p.device for p in params if p.device.type == dev.type}
            if len(kinds) == 1:
                return next(iter(kinds))
        return dev
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"optimizer_memory: the parameters live on several devices "
                         f"{sorted(map(str, devices))}; pass device= to say whose memory to model")
    return next(iter(devices)) if devices else torch.device("cpu")


def optimizer_memory(
    optimizer: torch.optim.Optimizer,
    *,
    has_grad: Callable[[torch.Tensor], bool] | None = None,
    device: torch.device | str | None = None,
) -> OptimizerMemory:
    """Model the state and ``step()`` temporaries of ``optimizer`` on one device (torch 2.13).

    ``has_grad(p)`` says whether ``p`` gets a gradient in the step (default ``p.requires_grad``);
    parameters without one are skipped by the optimizer and hold no state.  ``device`` is the
    device whose memory is modelled (default: the parameters' device); ``meta`` parameters are
    taken to live on it, so ``device="cuda"`` models what torch would do on CUDA (foreach by
    default).  Raises ``NotImplementedError`` for other optimizers, sparse gradients, complex
    parameters and configurations that are not modelled.
    """
    from fxmem.memory.low_bit_optimizer import low_bit_memory  # it builds on this module

    has_grad = has_grad if has_grad is not None else (lambda p: p.requires_grad)
    low_bit = low_bit_memory(optimizer, has_grad, device)  # torchao's, fxmem's bf16 state
    if low_bit is not None:
        return low_bit
    kind, label = _optimizer_kind(optimizer)
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    dev = _pick_device(all_params, device)
    names: list[str] = []
    state = peak = 0
    for g in optimizer.param_groups:
        params = [p for p in g["params"] if has_grad(p)]
        _check_params(params)
        if not params:
            continue
        placed = [dev if p.device.type == "meta" else p.device for p in params]
        variant = _variant(kind, g, [d.type for d in placed], params)
        _check_group(kind, g, variant)
        sizes = [_local_nbytes(p) if d == dev else 0 for p, d in zip(params, placed)]
        state += _state_bytes(kind, variant, g, placed, sizes, dev)
        group_sizes = _group_sizes(kind, variant, params, placed, sizes)
        trace = _Trace()
        _IMPLS[(kind, variant)](trace, sizes if variant == "single-tensor" else group_sizes, g)
        peak = max(peak, trace.peak)
        name = _group_name(kind, label, variant, g)
        if name not in names:
            names.append(name)
        logger.debug("optimizer_memory: param group of %d params with grads, %s -> %s",
                     len(params), dev, name)
    return OptimizerMemory(" + ".join(names) or label, state_bytes=state, step_peak_bytes=peak)


def _local_nbytes(p: torch.Tensor) -> int:
    """The bytes of ``p`` on this process: a ``DTensor``'s local shard (FSDP2's parameters: the
    optimizer's state and temporaries are ``zeros_like`` and ops of the shard on each rank)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # none exists before its import
    if dtensor is not None and isinstance(p, dtensor.DTensor):
        p = p.to_local()
    return p.numel() * p.element_size()


def _check_params(params: list[torch.Tensor]) -> None:
    """Raise ``NotImplementedError`` for a complex parameter or a sparse gradient."""
    for p in params:
        if p.is_complex():
            raise NotImplementedError(
                f"optimizer_memory: complex parameters ({p.dtype}) are not modelled"
            )
        if p.is_sparse or (p.grad is not None and p.grad.is_sparse):
            raise NotImplementedError("optimizer_memory: sparse gradients are not modelled")


def _state_bytes(kind: str, variant: str, g: dict, placed: list[torch.device], sizes: list[int],
                 dev: torch.device) -> int:
    """A param group's resident state on ``dev``: one tensor like each param per moment or
    momentum buffer, and Adam's ``step`` counters where they live on ``dev``. ``placed``: each
    param's (modelled) device; ``sizes``: its bytes on ``dev`` (0 elsewhere)."""
    if kind == "SGD":
        per_param = 1 if g["momentum"] != 0 else 0
    else:
        per_param = 3 if g["amsgrad"] else 2
    state = per_param * sum(sizes)
    if kind == "Adam" and variant == "fused":  # float32 `step` on the param's device
        state += 4 * sum(1 for d in placed if d == dev)
    elif kind == "Adam" and dev.type == "cpu":  # `step` on the CPU, default scalar dtype
        state += (8 if torch.get_default_dtype() == torch.float64 else 4) * len(placed)
    return state


def _group_sizes(kind: str, variant: str, params: list[torch.Tensor],
                 placed: list[torch.device], sizes: list[int]) -> list[int]:
    """The bytes on the modelled device of each (device, dtype) group that foreach and fused
    implementations work on, in the order foreach Adam visits them (see the module docstring)."""
    groups: dict[tuple[torch.device, torch.dtype], int] = {}
    for p, d, n in zip(params, placed, sizes):
        groups[(d, p.dtype)] = groups.get((d, p.dtype), 0) + n
    group_sizes = list(groups.values())
    if variant == "foreach" and kind == "Adam" and len([s for s in group_sizes if s]) > 2:
        if all(p.device == d for p, d in zip(params, placed)):  # torch's own (hash) order;
            group = torch_compat.GROUP_TENSORS_BY_DEVICE_AND_DTYPE()
            order = group([params], False)  # no alloc
            group_sizes = [groups[key] for key in order]
        else:  # meta params modelled elsewhere: order unknown, the two largest adjacent
            group_sizes = sorted(group_sizes)[-2:]
    return group_sizes


def _group_name(kind: str, label: str, variant: str, g: dict) -> str:
    """How the report names a param group's optimizer, e.g. "SGD momentum (foreach)"."""
    name = label
    if kind == "SGD" and g["momentum"] != 0:
        name += " nesterov" if g["nesterov"] else " momentum"
    elif kind == "Adam" and label == "Adam" and g.get("decoupled_weight_decay"):
        name += " decoupled"
    return name + f" ({variant})"
