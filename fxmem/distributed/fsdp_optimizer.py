"""The user's optimizer under :func:`fxmem.distributed.optimize_fsdp`: checked, moved onto the
FSDP2 shards, and counted at its bytes on each rank.

The order: build the optimizer on ``model.parameters()`` *before* ``optimize_fsdp`` and pass it
as ``optimizer=``. ``fully_shard`` replaces every parameter with a new one (a ``DTensor`` holding
the rank's shard), so ``optimize_fsdp`` moves the optimizer's param groups onto those, by name,
before the first ``step()`` (the optimizer object stays the user's; its hyper-parameters and
groups are kept). An optimizer that has stepped (it holds state for the full parameters), one
whose tensors are not the model's parameters (built on another model, or on an FSDP2 model's
shards: ``optimize_fsdp`` shards the model itself), and one fxmem cannot model are refused
before the model is sharded. An optimizer built after ``optimize_fsdp`` and not passed is not
counted: its state would be outside the plan.

Its bytes on a rank are :func:`fxmem.memory.optimizer.optimizer_memory` of the sharded
parameters (the one model of ``torch.optim``'s state and ``step()`` temporaries; a ``DTensor``
counts at its local shard), and the gradient shards ``step()`` reads are each FSDP2 group's
reduce-scatter output (:func:`fxmem.distributed.fsdp_memory.unit_sizes`).
"""

from __future__ import annotations

import logging

import torch

from fxmem.distributed.fsdp_memory import RankOptimizer, unit_sizes
from fxmem.errors import StepInputError

__all__ = ["check_optimizer", "move_onto_shards", "rank_optimizer"]

log = logging.getLogger(__name__)


def check_optimizer(optimizer, model: torch.nn.Module) -> dict[int, str]:
    """Refuse what cannot be planned; return each of the optimizer's parameters' name in
    ``model`` (by ``id``), to find it again once ``fully_shard`` has replaced it."""
    from fxmem.memory.optimizer import optimizer_memory

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    names = {id(p): n for n, p in model.named_parameters()}
    foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in names]
    if foreign:
        raise StepInputError(
            f"the optimizer holds {len(foreign)} tensor(s) that are not parameters of the model: "
            "build it on model.parameters() before optimize_fsdp and pass it as optimizer=; "
            "optimize_fsdp applies fully_shard and moves the optimizer onto the shards")
    optimizer_memory(optimizer)  # NotImplementedError now for what is not modelled
    if len(optimizer.state):
        raise StepInputError(
            "the optimizer has state (it has stepped): optimize_fsdp moves the optimizer onto "
            "the FSDP2 shards, which it can do only before its first step(); build it on "
            "model.parameters() and pass it before training")
    return {id(p): names[id(p)] for g in optimizer.param_groups for p in g["params"]}


def move_onto_shards(optimizer, model: torch.nn.Module, names: dict[int, str]) -> None:
    """Replace each parameter in the optimizer's groups with the one ``fully_shard`` put in its
    place in ``model`` (the full-size originals are then free)."""
    moved = 0
    for group in optimizer.param_groups:
        group["params"] = [model.get_parameter(names[id(p)]) for p in group["params"]]
        moved += len(group["params"])
    log.info("moved the optimizer's %d parameters onto their FSDP2 shards", moved)


def rank_optimizer(optimizer, model: torch.nn.Module, units: list[torch.nn.Module],
                   world: int) -> RankOptimizer:
    """The optimizer's bytes on this rank (its parameters already the FSDP2 shards)."""
    from fxmem.memory.optimizer import optimizer_memory

    mem = optimizer_memory(optimizer)
    in_units = {id(p) for u in units for p in u.parameters()}
    groups = [[p for p in u.parameters() if p.requires_grad] for u in units]
    groups.append([p for p in model.parameters() if p.requires_grad and id(p) not in in_units])
    gradients = sum(unit_sizes([_meta(p) for p in g], world).shard for g in groups if g)
    return RankOptimizer(mem.name, mem.state_bytes, mem.step_peak_bytes, gradients)


def _meta(p: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``p``'s full (global) shape and dtype."""
    return torch.empty(p.shape, dtype=p.dtype, device="meta")
