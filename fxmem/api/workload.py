"""A workload: a model, its inputs and optionally an optimizer — and the eager step that runs it.

Factories (``module:function`` on the command line) return either a dict with keys ``model``,
``args`` (tuple), ``kwargs`` (dict), and optionally ``optimizer``, ``loss_fn``, ``name``; or a
tuple ``(model, args)`` / ``(model, args, optimizer)``, where ``args`` is a tuple of positional
inputs or a dict of keyword inputs.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fxmem.graph.capture import loss_from_output
from fxmem.errors import StepInputError

__all__ = ["Workload", "load_workload"]


@dataclasses.dataclass
class Workload:
    model: torch.nn.Module
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    loss_fn: Callable[..., torch.Tensor] | None = None
    name: str = "workload"

    @classmethod
    def from_factory_result(cls, obj: Any, name: str = "workload") -> Workload:
        if isinstance(obj, Workload):
            return obj
        if isinstance(obj, Mapping):
            unknown = set(obj) - {"model", "args", "kwargs", "optimizer", "loss_fn", "name"}
            if unknown or "model" not in obj:
                raise StepInputError(
                    "a workload dict needs 'model' and may have 'args', 'kwargs', 'optimizer', "
                    f"'loss_fn', 'name'; got keys {sorted(obj)}"
                )
            fields = dict(obj)
            fields.setdefault("name", name)
            fields["args"] = tuple(fields.get("args", ()))
            fields["kwargs"] = dict(fields.get("kwargs", {}))
            return cls(**fields)
        if isinstance(obj, tuple) and len(obj) in (2, 3):
            model, inputs = obj[0], obj[1]
            optimizer = obj[2] if len(obj) == 3 else None
            if isinstance(inputs, Mapping):
                return cls(model, (), dict(inputs), optimizer, name=name)
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            return cls(model, args, {}, optimizer, name=name)
        raise StepInputError(
            "a workload factory must return a dict(model=..., args=..., kwargs=..., optimizer=...) "
            f"or a tuple (model, inputs[, optimizer]); got {type(obj).__name__}"
        )

    def estimate(self):
        from fxmem.api.estimate import estimate

        return estimate(
            self.model, *self.args, optimizer=self.optimizer, loss_fn=self.loss_fn, **self.kwargs
        )

    def step(self) -> float:
        """One eager training iteration; the model's output is held until the iteration ends."""
        if self.loss_fn is not None:
            output = self.loss_fn(self.model, *self.args, **self.kwargs)
            loss = output
        else:
            output = self.model(*self.args, **self.kwargs)
            loss = loss_from_output(output)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        del output, loss
        return value

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def roots(self) -> list:
        """What the step holds from its start: the model, the inputs, the optimizer (its state)
        and the tensors a ``loss_fn`` closes over -- ``measure_memory``'s ``baseline``."""
        roots = [self.model, list(self.args), list(self.kwargs.values())]
        if self.optimizer is not None:
            roots.append(self.optimizer)
        if self.loss_fn is not None:  # tensors a loss_fn closes over (its targets) are live too
            roots += [c.cell_contents for c in (getattr(self.loss_fn, "__closure__", None) or ())]
        return roots

    def measure(self, warmup: int = 1):
        """Measure one steady-state iteration (after ``warmup`` iterations create optimizer state).

        On the CPU the bytes live at the start are those of the step's own tensors -- the model,
        the inputs and the optimizer's state -- not every CPU tensor in the process."""
        from fxmem.memory.measure import measure_memory

        for _ in range(warmup):
            self.step()
        self.zero_grad()
        gc.collect()
        device = next(self.model.parameters()).device
        measured = measure_memory(self.step, device=device, baseline=self.roots())
        self.zero_grad()
        return measured


def load_workload(spec: str) -> Workload:
    """Import ``module:factory``, call the factory, and wrap what it returns."""
    if ":" not in spec:
        raise StepInputError(f"expected MODULE:FACTORY (e.g. fxmem.examples:demo_workload), got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StepInputError(f"cannot import module {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise StepInputError(f"module {module_name!r} has no callable {attr!r}")
    return Workload.from_factory_result(factory(), name=attr)
