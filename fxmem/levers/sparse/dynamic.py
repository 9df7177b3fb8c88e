"""Dynamic sparsity: every ``every`` steps, prune the smallest-magnitude weights of each sparse
layer and regrow as many elsewhere, so each layer's number of non-zeros stays fixed.

::

    model = fxmem.sparsify(model, density=0.1)
    opt = torch.optim.AdamW(model.parameters())
    model.sparsity.attach(opt, every=100, method="rigl", until=total_steps)
    for x, y in loader:
        loss = model(x, y); loss.backward(); opt.step(); opt.zero_grad()
        model.sparsity.step(x, y)       # counts the step; prunes and regrows every 100

- ``method="rigl"`` (Evci et al. 2020): regrow where the dense weight's gradient is largest.
  On an update step, ``step(*batch)`` runs one extra forward and backward of the model (eagerly,
  on that batch, the RNG state restored after) in which each sparse layer's dense weight is a
  leaf: as each layer's dense gradient is accumulated, a hook keeps the top positions and frees
  it, so one layer's dense gradient is alive at a time. Nothing else's ``.grad`` is touched.
- ``method="set"`` (Mocanu et al. 2018): regrow at positions drawn uniformly; needs no batch, and
  ``attach(..., hook=True)`` runs ``step()`` after each ``optimizer.step()`` by itself.
- ``method="static"``: the mask never changes (for comparisons).

The fraction pruned at update ``t`` decays as RigL's cosine, ``fraction * (1 + cos(pi t /
until)) / 2``, and updates stop at ``until`` (without ``until``: constant, never stopping).
Regrown weights start at zero, as does their optimizer state; survivors keep theirs
(:func:`fxmem.levers.sparse.regrow.rewire`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from fxmem.levers.sparse.layers import SparseLayer
from fxmem.levers.sparse.regrow import (random_free_positions, rewire, survivors,
                                        top_gradient_positions)
from fxmem.levers.sparse.report import SparsityReport, sparsity_report

__all__ = ["DynamicSparsity", "LayerUpdate", "UpdateRecord", "METHODS"]

log = logging.getLogger(__name__)

METHODS = ("rigl", "set", "static")


@dataclasses.dataclass(frozen=True)
class LayerUpdate:
    name: str
    nnz: int
    pruned: int
    regrown_at_pruned: int  # regrown positions that had just been pruned


@dataclasses.dataclass(frozen=True)
class UpdateRecord:
    """One prune/regrow update: at which step, the fraction pruned, per layer what moved."""

    step: int
    method: str
    fraction: float
    layers: tuple[LayerUpdate, ...]

    @property
    def moved(self) -> int:
        return sum(u.pruned - u.regrown_at_pruned for u in self.layers)


class DynamicSparsity:
    """The prune/regrow schedule of a sparsified model (``model.sparsity``)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.optimizer: torch.optim.Optimizer | None = None
        self.every, self.method, self.fraction, self.until = 100, "rigl", 0.3, None
        self.loss_fn: Callable | None = None
        self.steps = 0
        self.history: list[UpdateRecord] = []
        self._generator = torch.Generator().manual_seed(0)
        self._hook = None

    def attach(self, optimizer: torch.optim.Optimizer | None = None, *, every: int = 100,
               method: str = "rigl", fraction: float = 0.3, until: int | None = None,
               loss_fn: Callable | None = None, hook: bool = False,
               seed: int = 0) -> "DynamicSparsity":
        """Set the schedule. ``optimizer``: whose state moves with the values (default: the one
        :func:`~fxmem.levers.sparse.sparsify` was given, if any). ``loss_fn(model,
        *batch)``: RigL's loss when the model's output is not (or does not hold) it.
        ``hook=True`` (SET, static): :meth:`step` runs after each ``optimizer.step()``."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if every < 1 or not 0.0 <= fraction < 1.0:
            raise ValueError(f"need every >= 1 and 0 <= fraction < 1, got {every}, {fraction}")
        if hook and method == "rigl":
            raise ValueError("RigL needs a batch for its dense gradients: call "
                             "model.sparsity.step(*batch) in the loop instead of hook=True")
        if hook and (optimizer or self.optimizer) is None:
            raise ValueError("hook=True runs after optimizer.step(): pass the optimizer")
        self.optimizer = optimizer if optimizer is not None else self.optimizer
        self.every, self.method = every, method
        self.fraction, self.until, self.loss_fn = fraction, until, loss_fn
        self._generator = torch.Generator().manual_seed(seed)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if hook:
            self._hook = self.optimizer.register_step_post_hook(lambda *_: self.step())
        return self

    @property
    def layers(self) -> dict[str, SparseLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, SparseLayer)}

    def prune_fraction(self, step: int | None = None) -> float:
        """The fraction of each layer's non-zeros pruned (and regrown) at ``step``."""
        step = self.steps if step is None else step
        if self.until is None:
            return self.fraction
        if step >= self.until:
            return 0.0
        return self.fraction * (1.0 + math.cos(math.pi * step / self.until)) / 2.0

    def step(self, *args, **kwargs) -> UpdateRecord | None:
        """Count one training step; on every ``every``-th, prune and regrow (RigL scores
        positions on the batch ``*args, **kwargs``). Returns the update's record, or None."""
        self.steps += 1
        if self.method == "static" or self.steps % self.every:
            return None
        if self.prune_fraction() <= 0.0:
            return None
        return self.update(*args, **kwargs)

    def update(self, *args, **kwargs) -> UpdateRecord:
        """Prune and regrow now (whatever the schedule says)."""
        fraction = self.prune_fraction()
        layers = self.layers
        keep = {name: survivors(layer.values, self._n_prune(layer, fraction))
                for name, layer in layers.items()}
        if self.method == "rigl":
            if not args and not kwargs:
                raise ValueError("RigL regrows by the dense gradient on a batch: call "
                                 "model.sparsity.step(*batch) (or use method='set')")
            grown = self._rigl_positions(layers, keep, args, kwargs)
        else:
            grown = {name: self._set_positions(layer, keep[name]) for name, layer in layers.items()}
        rows = []
        for name, layer in layers.items():
            again = rewire(layer, keep[name], grown[name], self.optimizer)
            rows.append(LayerUpdate(name, layer.nnz, layer.nnz - keep[name].numel(), again))
        record = UpdateRecord(self.steps, self.method, fraction, tuple(rows))
        self.history.append(record)
        log.info("step %d: %s pruned and regrew %.3f of each layer (%d weights moved)",
                 self.steps, self.method, fraction, record.moved)
        return record

    @staticmethod
    def _n_prune(layer: SparseLayer, fraction: float) -> int:
        return min(round(fraction * layer.nnz), layer.nnz)  # as many positions are then free

    def _set_positions(self, layer: SparseLayer, keep: torch.Tensor) -> torch.Tensor:
        occupied = layer.indices.long()[keep.to(layer.indices.device)].sort().values
        k = layer.nnz - keep.numel()
        return random_free_positions(layer.numel_dense, occupied, k, self._generator)

    def _rigl_positions(self, layers, keep, args, kwargs) -> dict[str, torch.Tensor]:
        """One eager forward+backward on the batch, each layer's dense weight a leaf whose
        gradient a hook reduces to its top positions as soon as it is accumulated."""
        from fxmem.graph.capture import loss_from_output

        grown: dict[str, torch.Tensor] = {}
        leaves: list[torch.Tensor] = []

        def probe_for(name: str, layer: SparseLayer):
            occupied = layer.indices.long()[keep[name]]
            k = layer.nnz - keep[name].numel()

            def reduce(w: torch.Tensor) -> None:
                if name in grown:
                    raise ValueError(f"{name} is called more than once in the forward; RigL "
                                     "scores one call per layer (use method='set')")
                grown[name] = top_gradient_positions(w.grad, occupied, k)
                w.grad = None  # freed now: one layer's dense gradient at a time

            def watch(w: torch.Tensor) -> None:
                w.register_post_accumulate_grad_hook(reduce)
                leaves.append(w)

            return watch

        rng = torch.random.get_rng_state()
        # the scoring forward runs in the model's mode: BatchNorm would update its running
        # statistics (and count) once more than the user's own step did -- put them back after
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            for name, layer in layers.items():
                layer._probe = probe_for(name, layer)
            with torch.enable_grad():
                out = (self.loss_fn(self.model, *args, **kwargs) if self.loss_fn is not None
                       else self.model(*args, **kwargs))
                loss = out if self.loss_fn is not None else loss_from_output(out)
                del out
                torch.autograd.backward(loss, inputs=leaves)
        finally:
            torch.random.set_rng_state(rng)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for layer in layers.values():
                layer._probe = None
        missing = set(layers) - set(grown)
        if missing:
            raise ValueError(f"RigL: {sorted(missing)} got no gradient from the batch")
        return grown

    def report(self, optimizer: torch.optim.Optimizer | None = None) -> SparsityReport:
        """The sparse layers, their densities and bytes (with ``optimizer``'s state; default:
        the attached optimizer's)."""
        return sparsity_report(self.model, optimizer or self.optimizer, updates=len(self.history))

    def __deepcopy__(self, memo):
        """A copy bound to the copied model, without the optimizer (it is the original's)."""
        new = DynamicSparsity.__new__(DynamicSparsity)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key in ("optimizer", "_hook"):
                new.__dict__[key] = None
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __getstate__(self):
        return {k: (None if k in ("optimizer", "_hook") else v) for k, v in self.__dict__.items()}

    def __repr__(self) -> str:
        return (f"DynamicSparsity(method={self.method!r}, every={self.every}, "
                f"fraction={self.fraction}, until={self.until}, steps={self.steps}, "
                f"layers={len(self.layers)}, updates={len(self.history)})")
