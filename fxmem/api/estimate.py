"""``fxmem.estimate``: the peak bytes of a training step, predicted without running it.

The step is one steady-state training iteration as a user's loop runs it::

    out = model(*args, **kwargs)      # the caller holds `out` (e.g. HF logits) until the step ends
    loss_of(out).backward()
    optimizer.step()                  # when an optimizer is given
    optimizer.zero_grad()             # set_to_none: gradients do not outlive the iteration

Parameters, buffers, inputs and (with an optimizer) its state are live throughout; gradients
appear as the backward produces them. Nothing is allocated: the step is traced on fake tensors, so
models on the ``meta`` device can be estimated.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from fxmem.graph.capture import CapturedStep, capture_step
from fxmem.memory.simulation import MemoryTimeline, simulate
from fxmem.memory.optimizer import OptimizerMemory, optimizer_memory
from fxmem.memory.storages import step_storages
from fxmem.planning.options import OPTIMIZER_STEP, StepContext

__all__ = ["MemoryEstimate", "estimate", "estimate_captured"]

log = logging.getLogger(__name__)

_NO_LIMIT = 2**62  # a budget no step reaches: the plan saves everything


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """The predicted memory of a training step: peak, where it happens, breakdown, timeline."""

    timeline: MemoryTimeline
    device: torch.device
    optimizer: OptimizerMemory | None
    # the captured joint step (None for fxmem's unoptimised step: see estimate's ``lowering``)
    step: CapturedStep | None = dataclasses.field(repr=False)

    @property
    def peak(self) -> int:
        return self.timeline.peak

    @property
    def peak_at(self) -> str:
        """The node (or ``optimizer.step``) running when the peak happens."""
        return self.timeline.peak_label

    @property
    def peak_phase(self) -> str:
        i = self.timeline.peak_index
        if self.timeline.labels[i] == OPTIMIZER_STEP:
            return "optimizer"
        return "backward" if i >= self.timeline.backward_start else "forward"

    def breakdown(self, index: int | None = None) -> dict[str, int]:
        """Bytes by category at the peak (or at timeline point ``index``)."""
        return self.timeline.breakdown(index)

    def report(self) -> str:
        from fxmem.planning.report import format_estimate

        return format_estimate(self)


def estimate(
    model: torch.nn.Module,
    *args,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    lowering: str | None = None,
    **kwargs,
) -> MemoryEstimate:
    """Predict the peak device bytes of one training iteration of ``model`` on these inputs.

    ``loss_fn(model, *args, **kwargs)`` returns the loss when the model's output is not (or does
    not contain) it. With ``optimizer``, its state is resident and its ``step()`` is part of the
    iteration.

    ``lowering`` says which step: ``None`` (default), the step as eager PyTorch runs it -- your
    loop as it is, the autograd engine's order and frees; ``"eager"`` or ``"inductor"``, fxmem's
    unoptimised step as :func:`fxmem.optimize` with that lowering would run it before saving
    any memory -- the same capture, storage table and memory model as the plan, so
    ``estimate(..., lowering=L).peak == plan.unoptimized_peak`` to the byte. The two steps differ:
    AOTAutograd's functional graphs free some values earlier than the autograd engine does.
    """
    if lowering is not None:
        return _estimate_unoptimised(model, args, kwargs, optimizer, loss_fn, lowering)
    step = capture_step(model, args, kwargs, loss_fn=loss_fn)
    return estimate_captured(step, model, optimizer=optimizer)


def _estimate_unoptimised(model, args, kwargs, optimizer, loss_fn, lowering: str) -> MemoryEstimate:
    """fxmem's unoptimised step: the save-all plan of the capture ``fxmem.optimize`` makes."""
    from fxmem.api.optimize import optimize
    from fxmem.graph.capture import _model_device

    if optimizer is not None:
        _check_optimizer(optimizer, model)
    module = optimize(model, _NO_LIMIT, optimizer=optimizer, loss_fn=loss_fn, lowering=lowering,
                      allow=("recompute",))
    plan = module.plan_for(*args, **kwargs)
    opt_mem = None
    if optimizer is not None:
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        opt_mem = optimizer_memory(optimizer, has_grad=lambda p: id(p) in trained)
    return MemoryEstimate(timeline=plan.timeline, device=_model_device(model), optimizer=opt_mem,
                          step=None)


def estimate_captured(
    step: CapturedStep, model: torch.nn.Module, *, optimizer: torch.optim.Optimizer | None = None
) -> MemoryEstimate:
    """:func:`estimate` for a step already captured with :func:`fxmem.graph.capture.capture_step`."""
    storages = step_storages(step)
    context, opt_mem = StepContext(), None
    if optimizer is not None:
        _check_optimizer(optimizer, model)
        with_grad = {id(p) for name, p in model.named_parameters() if name in set(step.grad_of.values())}
        opt_mem = optimizer_memory(optimizer, has_grad=lambda p: id(p) in with_grad, device=step.device)
        context = StepContext.of_optimizer(opt_mem.state_bytes, opt_mem.step_peak_bytes)
    timeline = simulate(storages, constant=context.constant, epilogue=context.epilogue_points)
    log.debug("estimated peak %d bytes at %s", timeline.peak, timeline.peak_label)
    return MemoryEstimate(timeline=timeline, device=step.device, optimizer=opt_mem, step=step)


def _check_optimizer(optimizer, model) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    model_params = {id(p) for p in model.parameters()}
    foreign = sum(
        1 for g in optimizer.param_groups for p in g["params"] if id(p) not in model_params
    )
    if foreign:
        raise ValueError(
            f"the optimizer holds {foreign} tensor(s) that are not parameters of the model; "
            "build it from model.parameters()"
        )
