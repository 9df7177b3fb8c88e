"""``fxmem.optimize``: a module whose training step fits a memory budget, in the user's own loop.

    model = fxmem.optimize(model, budget="2GiB", optimizer=opt)
    loss = model(x, y); loss.backward(); opt.step(); opt.zero_grad()
    print(model.plan.report())

The first call for each input signature (shapes, dtypes, devices, non-tensor arguments, training
mode) captures the step through AOTAutograd, whose partitioner is fxmem's planner: the forward and
backward graphs it returns save what the solver chose and recompute the rest. ``lowering="eager"``
runs those graphs as FX code (the memory model's own semantics); ``lowering="inductor"`` compiles
them with TorchInductor.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from .budget import parse_budget
from .capture import _check_loss, _held_tensors, loss_from_output
from .errors import StepInputError
from .planner import LEVERS, Plan, PlanOptions, optimizer_bytes, plan_joint

__all__ = ["optimize", "OptimizedModule"]

log = logging.getLogger(__name__)


class _StepModule(torch.nn.Module):
    """The model and its loss as one module with flat tensor inputs: (loss, *held outputs)."""

    def __init__(self, model, loss_fn, leaves, spec, slots):
        super().__init__()
        self.model = model
        self.loss_fn, self.leaves, self.spec, self.slots = loss_fn, leaves, spec, slots
        self.output_layout: Any = None

    def forward(self, *tensors):
        leaves = list(self.leaves)
        for slot, t in zip(self.slots, tensors):
            leaves[slot] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        if self.loss_fn is not None:
            output = self.loss_fn(self.model, *args, **kwargs)
            _check_loss(output)
            loss = output
        else:
            output = self.model(*args, **kwargs)
            loss = loss_from_output(output)
        held = _held_tensors(output, loss)
        self.output_layout = _layout(output, loss, held)
        return (loss, *(h.detach() for h in held))


def _layout(output, loss, held):
    """How to rebuild the model's output from (loss, *held): a small recipe, no tensors."""
    if isinstance(output, torch.Tensor):
        return ("tensor",)
    if isinstance(output, Mapping):
        keys = [k for k, v in output.items() if isinstance(v, torch.Tensor)]
        return ("mapping", type(output), keys, [output[k] is loss for k in keys])
    if isinstance(output, (tuple, list)):
        return ("sequence", type(output), [x is loss for x in output
                                           if isinstance(x, torch.Tensor)])
    return ("namespace", [n for n in ("loss",)])


def _rebuild(layout, loss, held):
    kind = layout[0]
    if kind == "tensor":
        return loss
    rest = iter(held)
    if kind == "mapping":
        _, cls, keys, is_loss = layout
        values = {k: (loss if flag else next(rest)) for k, flag in zip(keys, is_loss)}
        try:
            return cls(**values)
        except TypeError:
            return dict(values)
    if kind == "sequence":
        _, cls, is_loss = layout
        return cls(loss if flag else next(rest) for flag in is_loss)
    return types.SimpleNamespace(loss=loss, outputs=tuple(held))


@dataclasses.dataclass
class _Compiled:
    fn: Callable
    plan: Plan | None
    step: _StepModule


class OptimizedModule(torch.nn.Module):
    """Wraps a model; plans on the first call for each input signature. ``plan`` is the latest."""

    def __init__(self, model, options: PlanOptions, *, optimizer=None, loss_fn=None,
                 lowering: str = "eager"):
        super().__init__()
        self.module = model
        self._options = options
        self._optimizer = optimizer
        self._loss_fn = loss_fn
        self._lowering = lowering
        self._compiled: dict[Any, _Compiled] = {}
        self._last: _Compiled | None = None

    @property
    def plan(self) -> Plan:
        if self._last is None or self._last.plan is None:
            raise RuntimeError("no plan yet: call the module on a batch first")
        return self._last.plan

    @property
    def plans(self) -> dict[Any, Plan]:
        return {sig: c.plan for sig, c in self._compiled.items() if c.plan is not None}

    def forward(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        tensors = [leaves[i] for i in slots]
        if not torch.is_grad_enabled() or not self.module.training:
            return self.module(*args, **kwargs)  # inference: no backward to plan for
        key = _signature(leaves, spec, slots)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compile(leaves, spec, slots, tensors)
            self._compiled[key] = compiled
        self._last = compiled
        loss, *held = compiled.fn(*tensors)
        return _rebuild(compiled.step.output_layout, loss, held)

    def _compile(self, leaves, spec, slots, tensors) -> _Compiled:
        from .capture import _model_device

        device = _model_device(self.module)
        for t in tensors:
            if t.device != device:
                raise StepInputError(f"an input is on {t.device} but the model is on {device}")
        constants = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        step = _StepModule(self.module, self._loss_fn, constants, spec, slots)
        holder: dict[str, Plan] = {}
        options = self._options
        if self._optimizer is not None:
            grads = [p for p in self.module.parameters() if p.requires_grad]
            state, step_bytes = optimizer_bytes(self._optimizer, self.module, grads)
            options = dataclasses.replace(options, optimizer_state=state, optimizer_step=step_bytes)
        n_static = len(list(step.named_parameters(remove_duplicate=False))) + \
            len(list(step.named_buffers(remove_duplicate=False)))
        partition = _Partitioner(options, holder, n_static)
        if self._lowering == "inductor":
            fn = _inductor(step, tensors, partition)
        else:
            fn = _eager(step, tensors, partition)
        return _Compiled(fn=fn, plan=_PlanRef(holder), step=step)


class _PlanRef:
    """The plan is made when AOTAutograd first runs the partitioner (at the first call)."""

    def __init__(self, holder):
        self._holder = holder

    def __getattr__(self, name):
        if "plan" not in self._holder:
            raise RuntimeError("the plan is made on the first call")
        return getattr(self._holder["plan"], name)

    def __repr__(self):
        return repr(self._holder.get("plan"))


class _Partitioner:
    """An AOTAutograd partition_fn that plans with fxmem."""

    def __init__(self, options: PlanOptions, holder: dict, n_static: int):
        self.options, self.holder, self.n_static = options, holder, n_static

    def __call__(self, joint, joint_inputs, *, num_fwd_outputs, **kwargs):
        # parameters and buffers come first among the primals; AOTAutograd may or may not say so
        static = set(kwargs.get("static_lifetime_input_indices") or ()) | set(range(self.n_static))
        plan = plan_joint(joint, num_fwd_outputs=num_fwd_outputs, static_input_indices=static,
                          options=self.options)
        self.holder["plan"] = plan
        log.info("fxmem plan: %s", plan.record.summary())
        return plan.graphs["forward"], plan.graphs["backward"]


def _boxed(gm: torch.fx.GraphModule, _example_inputs):
    """Run a graph as FX code with the boxed calling convention (inputs freed after last use)."""
    from torch.fx.graph import _BoxedCodeGen

    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()
    return gm


def _eager(step, tensors, partition):
    from torch._functorch.aot_autograd import aot_module_simplified

    return aot_module_simplified(step, tensors, fw_compiler=_boxed, bw_compiler=_boxed,
                                 partition_fn=partition)


def _inductor(step, tensors, partition):
    from .backend import compile_with_partitioner

    return compile_with_partitioner(step, tensors, partition)


def _signature(leaves, spec, slots) -> tuple:
    sig = []
    for i, x in enumerate(leaves):
        if i in slots:
            sig.append((tuple(x.shape), x.dtype, x.device, x.requires_grad))
        else:
            try:
                hash(x)
                sig.append(("const", x))
            except TypeError:
                sig.append(("const", repr(x)))
    return (spec, tuple(sig))


def optimize(
    model: torch.nn.Module,
    budget: int | str,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    allow: Iterable[str] = ("recompute",),
    strategy: str = "ilp",
    lowering: str = "eager",
    time_limit: float = 30.0,
    safety_margin: float = 0.0,
) -> OptimizedModule:
    """A module whose training step's peak memory stays under ``budget`` (bytes or "2GiB").

    ``allow`` names the levers a plan may use (exact ones by default). ``strategy`` picks the
    solver ("ilp", "greedy", "checkpoint-blocks", "save-all"); ``lowering`` runs the rewritten
    graphs as FX code ("eager") or compiles them with TorchInductor ("inductor").
    """
    if not isinstance(model, torch.nn.Module):
        raise StepInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if lowering not in ("eager", "inductor"):
        raise ValueError(f"lowering must be 'eager' or 'inductor', got {lowering!r}")
    allow = frozenset([allow] if isinstance(allow, str) else allow)
    if allow - LEVERS:
        raise ValueError(f"unknown levers {sorted(allow - LEVERS)}; the levers are {sorted(LEVERS)}")
    options = PlanOptions(budget=parse_budget(budget), allow=allow, strategy=strategy,
                          time_limit=time_limit, safety_margin=safety_margin)
    return OptimizedModule(model, options, optimizer=optimizer, loss_fn=loss_fn, lowering=lowering)
