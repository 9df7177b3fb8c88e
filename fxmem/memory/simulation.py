"""Simulate the bytes a step holds over time, at the level of storages, on plain data.

This module knows nothing of torch.fx: a step is a list of ops, each creating and reading
storages (views and in-place ops share one storage; a multi-output op creates several). The
adapter in :mod:`fxmem.storages` builds this data from a captured graph; the solver can build it
from anything.

Rules, matching eager PyTorch:
- resident storages (parameters, buffers, inputs) live from the start to the end;
- a storage is allocated when the op that creates it runs, and freed right after the last op that
  reads it, unless it is pinned (graph outputs: the loss, held outputs, gradients);
- while an op runs, its inputs and outputs are all live: the live bytes *at* an op include its
  outputs before its dead inputs are freed;
- gradient accumulation (``a + b`` in the backward where ``a`` dies there) reuses ``a``'s storage,
  as autograd's input buffer accumulates in place;
- optionally, buffer pooling as Inductor's generated code does it (``reuse_keys``): a dead buffer
  that a later allocation of the same key reuses stays allocated until that allocation;
- optionally, deferred frees (``release_after``): what dies at an op is freed only after a later
  op, as Inductor's C++ code frees the dead inputs of a group of kernels after the whole group.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["CATEGORIES", "Category", "StepStorages", "MemoryTimeline", "simulate"]

class Category(str, enum.Enum):
    """What holds a storage: the one list of names the breakdowns, reports and levers use (each
    member equals its name as a string, so ``{"optimizer state": n}`` works too)."""

    PARAMETERS = "parameters"
    BUFFERS = "buffers"
    GRADIENTS = "gradients"
    OPTIMIZER_STATE = "optimizer state"
    INPUTS = "inputs"
    SAVED = "saved activations"
    OUTPUTS = "outputs"
    TEMPORARIES = "temporaries"
    COMMUNICATION = "communication buffers"  # held beside the step (DDP's gradient buckets)

    def __str__(self) -> str:
        return self.value


CATEGORIES = tuple(c.value for c in Category)
_CAT = {c: i for i, c in enumerate(CATEGORIES)}


@dataclasses.dataclass(frozen=True)
class StepStorages:
    """A step as plain data. Op ``i`` creates ``creates[i]`` and reads ``reads[i]`` (storage ids)."""

    op_names: tuple[str, ...]
    creates: tuple[tuple[int, ...], ...]
    reads: tuple[tuple[int, ...], ...]
    nbytes: tuple[int, ...]  # per storage, as the device's allocator counts it
    category: tuple[str, ...]  # per storage, one of CATEGORIES
    resident: frozenset[int]  # alive from start to end, never allocated by an op
    pinned: frozenset[int]  # never freed before the end of the step
    accumulates: Mapping[int, tuple[int, ...]]  # created storage -> inputs it may take over
    backward_start: int  # index of the first backward op (== len(op_names) if none)
    node_storages: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # buffer pooling (Inductor's wrapper): a storage with a reuse key, made and freed by the same
    # graph (forward or backward), is not freed when it dies if a later storage of that graph
    # with the same key and in ``pool_recipients`` takes over its bytes -- it stays allocated
    # until then. What the forward makes and the backward frees is never pooled.
    reuse_keys: Mapping[int, object] = dataclasses.field(default_factory=dict)
    pool_recipients: frozenset[int] = frozenset()
    # per op: the op after which the storages that die at it are freed (empty: the op itself).
    # An input an op takes over (``accumulates``) still passes to it at its own op.
    release_after: tuple[int, ...] = ()
    # the pool's keys hold alignment too (Inductor's ``buffer_reuse_key``): an unaligned buffer
    # is pooled under a key no allocation asks for, so it is freed when it dies. On the CPU
    # Inductor assumes every graph input unaligned (``should_assume_input_aligned``), and so the
    # output of a fallback kernel that reads one (``FallbackKernel.create``'s
    # ``has_unaligned_input``): ``unaligned`` holds those outputs. A buffer a kernel writes in
    # place of one keeps its own name, and so Inductor's pool takes it as aligned
    unaligned: frozenset[int] = frozenset()

    def __post_init__(self):
        n = len(self.op_names)
        if len(self.creates) != n or len(self.reads) != n:
            raise ValueError("creates and reads need one entry per op")
        if self.release_after and (len(self.release_after) != n or any(
                not i <= r < n for i, r in enumerate(self.release_after))):
            raise ValueError("release_after needs one entry per op, each at or after its op")
        if len(self.nbytes) != len(self.category):
            raise ValueError("nbytes and category need one entry per storage")
        bad = set(self.category) - set(CATEGORIES)
        if bad:
            raise ValueError(f"unknown categories {sorted(bad)}; known: {CATEGORIES}")

    @property
    def num_storages(self) -> int:
        return len(self.nbytes)


@dataclasses.dataclass(frozen=True)
class MemoryTimeline:
    """Live bytes at every point of a step, by category.

    ``live[i, c]`` is the bytes of category ``CATEGORIES[c]`` live while point ``i`` runs (its
    outputs allocated, its dead inputs not yet freed).
    """

    labels: tuple[str, ...]
    live: np.ndarray  # shape (len(labels), len(CATEGORIES)), int64
    backward_start: int
    allocated: np.ndarray  # bytes allocated from the start up to and including each point

    @property
    def total(self) -> np.ndarray:
        return self.live.sum(axis=1)

    @property
    def peak_index(self) -> int:
        return int(np.argmax(self.total)) if len(self.labels) else 0

    @property
    def peak(self) -> int:
        return int(self.total[self.peak_index]) if len(self.labels) else 0

    @property
    def peak_label(self) -> str:
        return self.labels[self.peak_index]

    def breakdown(self, index: int | None = None) -> dict[str, int]:
        """Bytes by category at a point (the peak by default)."""
        i = self.peak_index if index is None else index
        return {c: int(self.live[i, k]) for k, c in enumerate(CATEGORIES)}


def simulate(
    step: StepStorages,
    *,
    order: Sequence[int] | None = None,
    constant: Mapping[str, int] | None = None,
    epilogue: Sequence[tuple[str, Mapping[str, int]]] = (),
    backward_constant: Mapping[str, int] | None = None,
) -> MemoryTimeline:
    """Run the step's ops in ``order`` (default: as given) and record the live bytes at each.

    ``constant`` adds bytes present throughout (e.g. optimizer state); ``backward_constant`` adds
    bytes present from the first backward op on (e.g. gradients another graph of the step made
    before this one's backward); ``epilogue`` appends points after the last op, each adding its
    own bytes to what is live at the end (e.g. an optimizer step's temporaries).
    """
    n_ops = len(step.op_names)
    order = list(range(n_ops)) if order is None else list(order)
    if sorted(order) != list(range(n_ops)):
        raise ValueError("order must be a permutation of the ops")
    position = {op: t for t, op in enumerate(order)}
    last_use = _last_uses(step, order, position)
    cat = np.array([_CAT[c] for c in step.category], dtype=np.int64)
    nbytes = np.array(step.nbytes, dtype=np.int64)
    live_by_cat = np.zeros(len(CATEGORIES), dtype=np.int64)
    for s in step.resident:
        live_by_cat[cat[s]] += nbytes[s]
    for c, b in (constant or {}).items():
        live_by_cat[_CAT[c]] += int(b)
    frees_at = _frees_at(step, order, position, last_use)
    takes = _take_overs(step, order, last_use, frees_at, nbytes)
    rows = np.zeros((len(order) + len(epilogue), len(CATEGORIES)), dtype=np.int64)
    allocated = np.zeros(len(order) + len(epilogue), dtype=np.int64)
    total_allocated = _run_ops(step, order, takes, frees_at, cat, nbytes, live_by_cat,
                               rows, allocated)
    for k, (_, extra) in enumerate(epilogue):
        row = live_by_cat.copy()
        for c, b in extra.items():
            row[_CAT[c]] += int(b)
            total_allocated += int(b)
        rows[len(order) + k] = row
        allocated[len(order) + k] = total_allocated

    backward_start = _backward_position(step, order)
    for c, b in (backward_constant or {}).items():
        rows[backward_start:, _CAT[c]] += int(b)
    labels = tuple(step.op_names[op] for op in order) + tuple(label for label, _ in epilogue)
    return MemoryTimeline(labels=labels, live=rows, backward_start=backward_start,
                          allocated=allocated)


def _backward_position(step: StepStorages, order: Sequence[int]) -> int:
    """The position in ``order`` of its first backward op (``len(order)`` if none)."""
    return next((t for t, op in enumerate(order) if op >= step.backward_start), len(order))


def _last_uses(step: StepStorages, order: Sequence[int],
               position: Mapping[int, int]) -> dict[int, int]:
    """Storage -> the position of the last op that reads it (or makes it, when none reads it);
    ``len(order)`` for pinned and resident storages, which live to the end."""
    creator = {}
    for op, created in enumerate(step.creates):
        for s in created:
            creator[s] = op
    last_use = {}
    for op, read in enumerate(step.reads):
        for s in read:
            last_use[s] = max(last_use.get(s, -1), position[op])
    for s, op in creator.items():  # a storage nobody reads dies right after it is made
        last_use[s] = max(last_use.get(s, -1), position[op])
    for s in step.pinned | step.resident:
        last_use[s] = len(order)
    return last_use


def _frees_at(step: StepStorages, order: Sequence[int], position: Mapping[int, int],
              last_use: Mapping[int, int]) -> dict[int, list[int]]:
    """Position -> the storages freed right after it: those dying there, or at an op whose frees
    ``release_after`` defers to it; position ``len(order)`` holds the storages that live to the
    end. Resident storages are never freed."""
    release = list(range(len(order)))  # position -> position after which its dead are freed
    if step.release_after:
        release = [max(t, position[step.release_after[op]]) for t, op in enumerate(order)]
    frees_at: dict[int, list[int]] = {}
    for s, t in last_use.items():
        if s not in step.resident:
            frees_at.setdefault(release[t] if t < len(order) else t, []).append(s)
    return frees_at


def _run_ops(step: StepStorages, order: Sequence[int], takes: Mapping[int, int],
             frees_at: Mapping[int, Sequence[int]], cat: np.ndarray, nbytes: np.ndarray,
             live_by_cat: np.ndarray, rows: np.ndarray, allocated: np.ndarray) -> int:
    """Run the ops in ``order`` from ``live_by_cat`` (updated in place): fill ``rows[t]`` with the
    live bytes by category while op ``t`` runs and ``allocated[t]`` with the bytes allocated up
    to it, then free what dies there. Returns the bytes allocated by the end of the last op."""
    taken_over = set(takes.values())  # storages whose bytes a later storage now holds
    total_allocated = 0
    for t, op in enumerate(order):
        for s in step.creates[op]:
            taken = takes.get(s)
            if taken is not None:  # s takes over taken's bytes: move them to s's category
                live_by_cat[cat[taken]] -= nbytes[taken]
            else:
                total_allocated += int(nbytes[s])
            live_by_cat[cat[s]] += nbytes[s]
        rows[t] = live_by_cat
        allocated[t] = total_allocated
        for s in frees_at.get(t, ()):
            if s in taken_over:
                continue  # its bytes now belong to the storage that took it over
            live_by_cat[cat[s]] -= nbytes[s]
    return total_allocated


def _take_overs(step: StepStorages, order: Sequence[int], last_use: Mapping[int, int],
                frees_at: Mapping[int, Sequence[int]], nbytes: np.ndarray) -> dict[int, int]:
    """Which created storage takes over which dead storage's bytes: an accumulation into an input
    that dies at that op, else (with ``reuse_keys``) a pooled buffer of its key freed earlier in
    the same graph (last freed, first reused, as Inductor's wrapper pops its pool). Not
    modelled: Inductor declines a reuse that would hold a buffer above its own estimate of the
    graph's peak (``AllocateLine.should_reuse_buffer``); the model reuses it, holding more."""
    takes: dict[int, int] = {}
    taken_over: set[int] = set()
    pools: dict[object, list[int]] = {}
    bw_start = _backward_position(step, order)
    made_in_fw = {s for t, op in enumerate(order[:bw_start]) for s in step.creates[op]}
    for t, op in enumerate(order):
        if t == bw_start:
            pools.clear()  # the backward is another graph with its own pool
        for s in step.creates[op]:
            taken = next(
                (a for a in step.accumulates.get(s, ()) if last_use.get(a) == t
                 and a not in step.pinned and a not in step.resident
                 and nbytes[a] == nbytes[s] and a not in taken_over),
                None,
            )
            if taken is None and s in step.pool_recipients and pools.get(step.reuse_keys.get(s)):
                taken = pools[step.reuse_keys[s]].pop()
            if taken is not None:
                takes[s] = taken
                taken_over.add(taken)
        for s in frees_at.get(t, ()):
            if s in step.reuse_keys and s not in taken_over and s not in step.pinned \
                    and s not in step.unaligned \
                    and not (t >= bw_start and s in made_in_fw):  # a backward input
                pools.setdefault(step.reuse_keys[s], []).append(s)
    return takes
