"""``DistributedDataParallel`` over an fxmem step: each rank's step fits the rank's budget.

    dist.init_process_group("gloo")               # or "nccl", launched by torchrun
    model = optimize_ddp(model, budget="2GiB", optimizer=opt)
    loss = model(x, y); loss.backward(); opt.step(); opt.zero_grad()

Which wraps which: DDP wraps the :class:`fxmem.OptimizedModule` (``DDP(fxmem.optimize(model))``),
so DDP's hooks reduce the gradients that fxmem's compiled backward makes, and its buckets are
counted in the rank's budget. The other order, ``fxmem.optimize(DDP(model))``, is refused with
a message (fxmem would capture DDP's own forward). Under fxmem's one-graph capture Dynamo's DDP
optimizer is off (:func:`fxmem.graph.torch_compat.one_graph_capture`): the step is planned as one
graph, and the gradients are reduced once the compiled backward has made them (no overlap of
communication with the backward).

What DDP holds beyond the step: its gradient buckets, flat buffers the size of the gradients
(``bucket_sizes`` in DDP's logging data), allocated when DDP is built and held for as long as it
lives -- with ``gradient_as_bucket_view`` the gradients are views of them, but the compiled
backward still makes each gradient before the reducer copies it in. They count as
"communication buffers", held throughout the step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from fxmem.errors import StepInputError
from fxmem.memory.simulation import Category

__all__ = ["optimize_ddp", "bucket_bytes", "measure_rank_step"]

log = logging.getLogger(__name__)


def bucket_bytes(ddp: torch.nn.parallel.DistributedDataParallel) -> int:
    """The bytes of ``ddp``'s gradient buckets, from its logging data."""
    sizes = str(ddp._get_ddp_logging_data().get("bucket_sizes", "") or "")
    return sum(int(s) for s in sizes.split(",") if s.strip())


def measure_rank_step(step, ddp: torch.nn.parallel.DistributedDataParallel, roots, *,
                      device: torch.device | str | None = None):
    """:func:`fxmem.measure_memory` of ``step`` on this rank, counting as live at its start what
    the rank holds: the storages of ``roots`` (the model, its inputs, the optimizer) and DDP's
    gradient buckets (held by DDP's reducer, which no Python object reaches)."""
    import fxmem
    from fxmem.memory.measure import live_tensor_bytes

    if device is None:
        device = next(ddp.parameters()).device
    start = live_tensor_bytes(device, roots=roots) + bucket_bytes(ddp)
    return fxmem.measure_memory(step, device=device, baseline=start)


def require_process_group(caller: str) -> None:
    """A RuntimeError naming ``caller`` unless a torch.distributed process group is initialised."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError(f"{caller} needs an initialised process group: call "
                           "torch.distributed.init_process_group first (torchrun sets the "
                           "environment it reads)")


def optimize_ddp(model: torch.nn.Module, budget: int | str, *,
                 ddp_options: Mapping[str, Any] | None = None,
                 **options) -> torch.nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(fxmem.optimize(model, budget, **options), **ddp_options)``, whose
    step on each rank fits ``budget`` with DDP's gradient buckets counted. The process group must
    be initialised. ``ddp_options`` are DDP's (``device_ids``, ``bucket_cap_mb``,
    ``gradient_as_bucket_view``...)."""
    import fxmem

    require_process_group("optimize_ddp")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise StepInputError("pass the model itself, not DistributedDataParallel(model): "
                             "optimize_ddp wraps fxmem's module in DDP (DDP outside, fxmem "
                             "inside)")
    module = fxmem.optimize(model, budget, **options)
    ddp = torch.nn.parallel.DistributedDataParallel(module, **dict(ddp_options or {}))
    held = bucket_bytes(ddp)
    module.hold_beside({Category.COMMUNICATION: held})
    log.info("fxmem: rank %d holds %d bytes of DDP gradient buckets beside the step",
             torch.distributed.get_rank(), held)
    return ddp
