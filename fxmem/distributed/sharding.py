"""Per-rank memory on paper: one step's timeline (fxmem's model of one rank's step) with what
data parallelism shards and what it adds.

At every point of the timeline (:class:`fxmem.memory.simulation.MemoryTimeline`):

- ``"ddp"``: every rank holds the whole model; DDP adds its gradient buckets, flat buffers the
  size of the gradients, held throughout (as :func:`fxmem.distributed.optimize_ddp` counts them).
- ``"fsdp2"`` (``fully_shard`` on each block and on the root): parameters, gradients and
  optimizer state are sharded, ``1/world`` of each on a rank; while a block runs its parameters
  are all-gathered, and the next block's are prefetched (``prefetch`` blocks); in the backward a
  block's unsharded gradients wait for their reduce-scatter. The root's own parameters (the
  embeddings and the head) are all-gathered for the whole step. Those unsharded bytes are added
  throughout the step (an upper bound: the forward holds no unsharded gradients).

Activations (saved values, temporaries, inputs, outputs) are the rank's own batch's, as the
timeline has them. This is arithmetic on fxmem's model, not a measurement; the FSDP2 step that
runs under fxmem (:func:`fxmem.distributed.optimize_fsdp`) is modelled point by point, as
measured, in :mod:`fxmem.distributed.fsdp_memory`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fxmem.memory.simulation import CATEGORIES, Category, MemoryTimeline

__all__ = ["PerRank", "per_rank", "STRATEGIES"]

STRATEGIES = ("ddp", "fsdp2")
_SHARDED = (Category.PARAMETERS, Category.GRADIENTS, Category.OPTIMIZER_STATE)


@dataclasses.dataclass(frozen=True)
class PerRank:
    """One rank's predicted peak under a data-parallel strategy, and what holds it."""

    strategy: str
    world: int
    peak: int
    at: str  # the op running at the peak
    breakdown: dict[str, int]  # bytes by category at the peak ("communication buffers" added)


def per_rank(timeline: MemoryTimeline, world: int, *, strategy: str, block_bytes: int = 0,
             root_bytes: int = 0, prefetch: int = 1) -> PerRank:
    """The peak of ``timeline`` (one rank's step, whole model) on each of ``world`` ranks under
    ``strategy`` ("ddp" or "fsdp2"). For FSDP2, ``block_bytes`` is the parameter bytes of the
    largest sharded block and ``root_bytes`` those of the root module's own parameters."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if min(block_bytes, root_bytes, prefetch) < 0:
        raise ValueError("block_bytes, root_bytes and prefetch must be non-negative")
    live = timeline.live.astype(np.int64).copy()
    column = {c: CATEGORIES.index(c.value) for c in Category}
    extra = np.zeros(len(timeline.labels), dtype=np.int64)
    if strategy == "ddp":
        gradients = int(timeline.live[:, column[Category.GRADIENTS]].max())
        extra += gradients  # the buckets: the gradients' size, held throughout
    else:
        for category in _SHARDED:
            live[:, column[category]] = -(-live[:, column[category]] // world)
        extra += (1 + prefetch) * block_bytes + block_bytes + root_bytes
    live[:, column[Category.COMMUNICATION]] += extra
    total = live.sum(axis=1)
    k = int(total.argmax())
    breakdown = {c: int(live[k, i]) for i, c in enumerate(CATEGORIES) if live[k, i]}
    return PerRank(strategy, world, int(total[k]), timeline.labels[k], breakdown)
