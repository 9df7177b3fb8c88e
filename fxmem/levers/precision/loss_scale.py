"""Dynamic loss scaling for fp16 compute, in the user's own loop.

fp16 keeps 5 bits of exponent: a gradient under 2**-24 flushes to zero in an fp16 backward, one
over 65504 overflows. As ``torch.amp.GradScaler`` does, the backward runs on the loss times a
scale ``S`` (2**16 to start), the gradients are divided by ``S``, and a backward whose gradients
overflowed (inf or nan) is not applied: ``S`` is halved and the step skipped. After
``growth_interval`` good backward passes in a row ``S`` doubles.

Unlike GradScaler it needs no change to the loop (``loss = model(x, y); loss.backward();
opt.step(); opt.zero_grad()``). :class:`LossScaler` does it with two hooks on the autograd node
of fxmem's compiled step (the node whose backward is the planned backward graph):

- **scale**: a pre-hook multiplies the gradients entering the node (the loss's: 1 from
  ``loss.backward()``) by ``S``, so the fp16 backward runs on ``loss * S``;
- **unscale**: a hook divides the gradients leaving the node (the parameters' and any input's)
  by ``S`` before autograd accumulates them, and checks them for inf/nan, in one
  ``torch._amp_foreach_non_finite_check_and_unscale_`` per device and dtype (what GradScaler
  calls). Only the step's own gradients are scaled: a term the user adds to the loss
  (``model(x, y) + reg``), a ``p.register_hook`` and gradient accumulation over several backward
  calls all see unscaled gradients. A microbatched step runs each microbatch's backward inside
  the forward: each is scaled and unscaled there, and the whole batch's loss carries the check;
- **skip**: the pre-hook also queues a callback on the autograd engine, run once the whole
  backward has finished (every gradient accumulated), as DistributedDataParallel does. On
  overflow it sets every parameter's ``.grad`` to None, so ``optimizer.step()`` leaves them alone
  (torch's optimizers skip a parameter whose gradient is None: the weights, the moments and the
  per-parameter step counts are untouched, as when GradScaler skips ``optimizer.step``). When
  fxmem knows the optimizer (``fxmem.optimize(optimizer=...)`` or ``module.optimizer = opt``) a
  step pre-hook also drops the gradients of every parameter the optimizer holds when any
  backward since its last step overflowed: with gradient accumulation the whole step is skipped
  as GradScaler skips it, parameters upstream of the module's inputs included. Without the
  optimizer only the module's gradients accumulated up to the overflow are dropped (later
  backward passes accumulate afresh, and upstream parameters keep what reached them). A
  learning-rate scheduler still steps, as with GradScaler;
- **across ranks**: under DistributedDataParallel (``fxmem.distributed.optimize_ddp``) each rank
  checks the gradients its own step made; the decision runs after DDP has written the reduced
  gradients (a callback queued from a callback runs after DDP's), and with a process group of
  more than one rank it also checks those, in which another rank's overflow shows as inf or nan,
  so every rank skips the same steps and keeps the same scale. No collective is added (nothing
  can hang). Not covered: a backward under DDP's ``no_sync()`` is not reduced, so its overflow
  is seen by its rank alone and the ranks may then skip different steps: accumulate with
  ``no_sync()`` under ``loss_scaling="off"`` and GradScaler;
- **adapt**: overflow: ``S *= backoff_factor`` and the count of good passes restarts; else after
  ``growth_interval`` good passes in a row ``S *= growth_factor``. Counted per backward pass
  (one per step in the ordinary loop), where GradScaler counts per ``update()``.

Reading the overflow flag is one device sync per backward (GradScaler syncs once per step).

A user who scales the loss with their own GradScaler passes ``loss_scaling="off"`` to
``fxmem.optimize``: fxmem then leaves the backward alone and the user's
``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()`` does everything. With
"auto" both would scale: the backward would run at the product of the two scales and overflow
sooner, and fxmem would drop an overflowing step's gradients before GradScaler sees them (which
then counts the step as good). bf16 keeps fp32's exponent and needs no loss scaling.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

from fxmem.graph import torch_compat

__all__ = ["LossScaling", "LossScaler", "LOSS_SCALING_MODES", "check_loss_scaling",
           "loss_scale_line"]

log = logging.getLogger(__name__)

#: ``fxmem.optimize(loss_scaling=...)``: "auto" scales when the plan computes in fp16; "off" never
#: (the user scales, e.g. with torch.amp.GradScaler, or accepts fp16's underflow)
LOSS_SCALING_MODES = ("auto", "off")


@dataclasses.dataclass(frozen=True)
class LossScaling:
    """Dynamic loss scaling's options (torch.amp.GradScaler's defaults)."""

    init_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self):
        for name in ("init_scale", "growth_factor", "backoff_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.init_scale <= 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale!r}")
        if self.growth_factor <= 1:
            raise ValueError(f"growth_factor must be above 1, got {self.growth_factor!r}")
        if not 0 < self.backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor!r}")
        if isinstance(self.growth_interval, bool) or not isinstance(self.growth_interval, int) \
                or self.growth_interval < 1:
            raise ValueError(f"growth_interval must be a positive int, got "
                             f"{self.growth_interval!r}")

    def describe(self) -> str:
        return (f"dynamic, from {self.init_scale:g}: x{self.growth_factor:g} after "
                f"{self.growth_interval} good backward passes, x{self.backoff_factor:g} and the "
                "step skipped on overflow")


def check_loss_scaling(loss_scaling) -> LossScaling | None:
    """The options ``fxmem.optimize(loss_scaling=...)`` stands for: "auto" (the defaults) or a
    :class:`LossScaling` scale fp16 plans; "off" gives None."""
    if isinstance(loss_scaling, LossScaling):
        return loss_scaling
    if loss_scaling == "auto":
        return LossScaling()
    if loss_scaling == "off":
        return None
    raise ValueError(f"loss_scaling must be one of {LOSS_SCALING_MODES} or a "
                     f"fxmem.levers.precision.LossScaling, got {loss_scaling!r}")


class _Pass:
    """One backward of a step: the scale it runs at, the overflow flags its hooks found."""

    __slots__ = ("scale", "found", "queued")

    def __init__(self, scale: float | None = None):
        self.scale, self.found, self.queued = scale, [], False


class LossScaler:
    """Dynamic loss scaling of the backward of fxmem's step, whose gradients reach ``params``
    (those requiring grad are dropped on overflow). State: :attr:`scale`,
    :attr:`growth_tracker` (good backward passes since the scale last changed), :attr:`skipped`
    and :attr:`passes` (backward passes skipped and run)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], options: LossScaling | None = None):
        self.options = LossScaling() if options is None else options
        if not isinstance(self.options, LossScaling):
            raise TypeError(f"options must be a LossScaling, got {type(self.options).__name__}")
        self.params = [p for p in params if p.requires_grad]
        self.scale = float(self.options.init_scale)
        self.growth_tracker = 0
        self.skipped = 0
        self.passes = 0
        self._overflowed = False  # since the optimizer last stepped
        self._hooks: list = []

    # -- the step's autograd node ---------------------------------------------------------
    def watch(self, loss: torch.Tensor) -> torch.Tensor:
        """Scale the backward of the step whose loss is ``loss`` (its ``grad_fn`` is the
        compiled step's node), unscale and check its gradients, and skip on overflow once the
        backward is over. Returns ``loss`` itself."""
        node = loss.grad_fn
        if node is None:  # nothing requires grad: no backward to scale
            return loss
        _check_step_node(node)
        state = {"pass": None}

        def pre(grad_outputs):
            state["pass"] = p = _Pass(self.scale)
            self._queue(p)
            return _scaled(grad_outputs, p.scale)

        node.register_prehook(pre)
        node.register_hook(lambda grad_inputs, _: self._unscaled(grad_inputs, state["pass"]))
        return loss

    def microbatched(self, fn: Callable, make_runtime: Callable[[Callable], Callable]
                     ) -> Callable:
        """The microbatch loop ``make_runtime(fn)`` (``(tensors) -> (loss, held)``, each
        microbatch's backward run inside it) with each microbatch's backward scaled and
        unscaled at the scale of the call, and the whole batch's loss checking them all when
        its backward is over."""
        current: list[_Pass] = []

        def scaled_fn(*tensors):
            out = fn(*tensors)
            node = out[0].grad_fn
            if node is not None:
                _check_step_node(node)
                p = current[-1]
                node.register_prehook(lambda grad_outputs: _scaled(grad_outputs, p.scale))
                node.register_hook(lambda grad_inputs, _: self._unscaled(grad_inputs, p))
            return out

        runtime = make_runtime(scaled_fn)

        def run(tensors):
            p = _Pass(self.scale)
            current.append(p)
            try:
                loss, held = runtime(tensors)
            finally:
                current.pop()
            if loss.grad_fn is not None:
                loss.grad_fn.register_prehook(lambda grad_outputs: self._queue(p))
            return loss, held

        return run

    def _queue(self, p: _Pass) -> None:
        """Have :meth:`_end` run once the backward is over, after the callbacks queued while it
        ran (DistributedDataParallel's, which writes the reduced gradients): a callback queued
        from a callback runs after those already queued."""
        if not p.queued:
            p.queued = True
            queue = torch_compat.QUEUE_AUTOGRAD_CALLBACK()
            queue(lambda: queue(lambda: self._end(p)))

    def _unscaled(self, grads, p: _Pass):
        """``grads`` divided by ``p.scale`` (in place where a gradient owns its elements), their
        overflow flags added to ``p.found``."""
        groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        done: dict[int, torch.Tensor] = {}  # id of a gradient -> the tensor unscaled for it
        for g in grads:
            if g is None or id(g) in done:  # one tensor for two inputs: unscaled once
                continue
            own = g
            if g.is_sparse or any(st == 0 and n > 1 for st, n in zip(g.stride(), g.shape)):
                own = (g.coalesce() if g.is_sparse else g).clone()  # elements not its own
            done[id(g)] = own
            groups[(own.device, own.dtype)].append(own._values() if own.is_sparse else own)
        out = [None if g is None else done[id(g)] for g in grads]
        for (device, _), group in groups.items():
            found = torch.zeros((), dtype=torch.float32, device=device)
            inv = torch.full((), 1.0 / p.scale, dtype=torch.float32, device=device)
            torch_compat.AMP_UNSCALE()(group, found, inv)
            p.found.append(found)
        return tuple(out)

    def _end(self, p: _Pass) -> None:
        """Once a backward is over: skip it on overflow and adapt the scale."""
        found_inf = bool(sum(f.item() for f in p.found)) if p.found else False
        p.found = []
        if not found_inf and _distributed():  # another rank's overflow, in the reduced grads
            found_inf = not _all_finite([q.grad for q in self.params if q.grad is not None])
        self.passes += 1
        if found_inf:
            for q in self.params:
                q.grad = None
            self._overflowed = True
            self.skipped += 1
            self.scale *= self.options.backoff_factor
            self.growth_tracker = 0
            log.info("fxmem loss scaling: gradients overflowed at scale %g; the step is skipped "
                     "and the scale is now %g", p.scale, self.scale)
            return
        self.growth_tracker += 1
        if self.growth_tracker >= self.options.growth_interval:
            self.scale *= self.options.growth_factor
            self.growth_tracker = 0

    # -- the optimizer --------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Skip the whole step of ``optimizer`` when a backward since its last step
        overflowed (gradient accumulation); None detaches."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if optimizer is not None:
            self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                           optimizer.register_step_post_hook(self._after_step)]

    def _before_step(self, optimizer, args, kwargs):
        if self._overflowed:
            for group in optimizer.param_groups:
                for q in group["params"]:
                    q.grad = None

    def _after_step(self, optimizer, args, kwargs):
        self._overflowed = False

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "skipped": self.skipped, "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.skipped = int(state.get("skipped", 0))
        self.passes = int(state.get("passes", 0))

    def __str__(self) -> str:
        return (f"loss scaling: scale {self.scale:g} ({self.options.describe()}); "
                f"{self.skipped} of {self.passes} backward passes skipped on overflow")


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_finite(grads: list[torch.Tensor]) -> bool:
    """No inf or nan in ``grads`` (their largest magnitudes: read only, one sync)."""
    dense = [g._values() if g.is_sparse else g for g in grads]
    if not dense:
        return True
    peaks = torch_compat.FOREACH_NORM()(dense, ord=float("inf"))
    return bool(torch.stack([t.float().to(peaks[0].device) for t in peaks]).isfinite().all())


def _check_step_node(node) -> None:
    """The loss's autograd node is the compiled step's, whose backward is the planned one (a
    view or a copy outside it would be scaled and unscaled around nothing)."""
    if not type(node).__name__.startswith("CompiledFunction"):
        raise RuntimeError(f"fxmem loss scaling: the loss's autograd node is "
                           f"{type(node).__name__}, not the compiled step's (fxmem's bug)")


def _scaled(grads, scale: float):
    return tuple(None if g is None else g * scale for g in grads)


def loss_scale_line(options: LossScaling | None, scaler: LossScaler | None) -> str:
    """The report's line on an fp16 plan's loss scaling: off, its options, or the scaler's
    state once it has run."""
    if options is None:
        return ("loss scaling: off (loss_scaling='off'): the float16 backward runs on the loss "
                "as the caller gives it; scale it yourself (torch.amp.GradScaler)")
    if scaler is None:
        return f"loss scaling: {options.describe()}"
    return str(scaler)
