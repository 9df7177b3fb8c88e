"""The recompute problem as plain data, and its linear memory model.

A step is a timeline of positions (forward ops, then backward ops). Candidates are forward values
the backward may need. Each is either *saved* (kept alive from its creation until its last need in
the backward) or *recomputed* (freed after its last forward use, made again in the backward just
before it is first needed and freed after its last need). Recomputing a value needs its inputs, so
a recomputed value's candidate inputs are needed too.

Memory at position ``t`` (a linear function of the decision, with the pull terms below)::

    base[t] + sum_i size[i] * (saved[i] * keep[i, t] + recomputed[i] * again[i, t])
            + sum_i size[i] * pulled[i, t]

(``again_size`` replaces ``size`` in the recomputed and pulled terms where the lowering fuses a
recomputed value into its consumers), plus ``sum_i transient[i] * recomputed[i]`` at
``need_start[i]`` alone: what the recomputation allocates and frees at once -- its op's scratch and
the outputs of a multi-output op that nothing needs (replaying dropout on the CPU draws its noise
into a tensor as large as its input).

where ``base`` is what the step holds when nothing is kept past its forward use, ``keep[i, t]``
is 1 on ``(fwd_end[i], need_end[i]]`` and ``again[i, t]`` on ``[need_start[i], need_end[i]]``.
A value is recomputed once, for its first need: when recomputing another value reads it earlier
than its own need (a *pull*), it lives from that earlier point (``pulled``).
Solvers see only this module; :mod:`fxmem.recompute_problem` builds it from a graph.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

__all__ = ["RecomputeProblem", "Decision", "Pull"]


@dataclasses.dataclass(frozen=True)
class Pull:
    target: int
    by: int
    start: int
    interior: tuple[int, ...]
    far: bool


@dataclasses.dataclass(frozen=True)
class RecomputeProblem:
    names: tuple[str, ...]  # one per candidate, for reports
    size: np.ndarray  # bytes
    cost: np.ndarray  # seconds to recompute the candidate's op
    fwd_end: np.ndarray  # last forward position holding it (>= its producer's position)
    need_start: np.ndarray  # first backward position needing it (-1: only needed via recompute)
    need_end: np.ndarray  # last backward position needing it
    direct: np.ndarray  # bool: the backward reads it (not only recomputations)
    inputs: tuple[tuple[int, ...], ...]  # candidates its op reads
    must_save: np.ndarray  # bool: may not be recomputed (random without replay, mutation, ...)
    never_save: np.ndarray  # bool: never worth saving on its own (fused into its consumer)
    base: np.ndarray  # bytes per position with nothing kept past its forward use
    backward_start: int
    block: np.ndarray  # int: the block (e.g. transformer layer) each candidate belongs to; -1 none
    # A value is recomputed once, for its first need. Recomputing `by` (first needed at `start`)
    # reads `target` through the `interior` values; if none of them is saved, `target` is made at
    # `start`, earlier than its own need, and lives from there. `far` pulls are forbidden instead:
    # `target` (or an interior value) must then be saved.
    pulls: tuple[Pull, ...] = ()
    # bytes a recomputed copy occupies in the backward (default ``size``); 0 for a value the
    # lowering fuses into its consumers (Inductor inlines recomputed pointwise ops)
    again_size: np.ndarray | None = None
    # bytes a recomputation allocates and frees at its first need beyond the value (default 0)
    transient: np.ndarray | None = None
    # seconds saving the candidate costs (default 0): storing a value in fewer bits casts it
    # down in the forward and back in the backward (fxmem.levers.precision.stored)
    save_cost: np.ndarray | None = None
    # bool (default False): saving the candidate changes numerics (a value stored in fewer bits);
    # the baselines never save such a candidate, the ILP saves one only where it pays
    lossy: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.names)
        if self.again_size is None:
            object.__setattr__(self, "again_size", np.asarray(self.size).copy())
        if self.transient is None:
            object.__setattr__(self, "transient", np.zeros(n, dtype=np.int64))
        if self.save_cost is None:
            object.__setattr__(self, "save_cost", np.zeros(n, dtype=np.float64))
        if self.lossy is None:
            object.__setattr__(self, "lossy", np.zeros(n, dtype=bool))
        for field in ("size", "again_size", "transient", "save_cost", "lossy", "cost", "fwd_end", "need_start", "need_end", "direct", "must_save",
                      "never_save", "block"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"{field} needs one entry per candidate ({n})")
        if len(self.inputs) != n:
            raise ValueError("inputs needs one entry per candidate")
        clash = np.flatnonzero(self.must_save & self.never_save)
        if len(clash):
            raise ValueError(f"candidates both must_save and never_save: {clash[:5].tolist()}")

    @property
    def exact_saves(self) -> np.ndarray:
        """What saving everything means: every candidate worth saving on its own whose saving
        keeps numerics exact."""
        return ~self.never_save & ~self.lossy

    @property
    def num_candidates(self) -> int:
        return len(self.names)

    @property
    def num_positions(self) -> int:
        return len(self.base)

    def needed(self, saved: np.ndarray) -> np.ndarray:
        """Which candidates the backward needs under a decision: the ones it reads, and the inputs
        of every needed candidate that is recomputed."""
        need = self.direct.copy()
        stack = list(np.flatnonzero(need & ~saved))
        while stack:
            i = stack.pop()
            for k in self.inputs[i]:
                if not need[k]:
                    need[k] = True
                    if not saved[k]:
                        stack.append(k)
        return need

    @functools.cached_property
    def _pull_arrays(self) -> _PullArrays:
        return _PullArrays.of(self.pulls)

    def active_pulls(self, saved: np.ndarray, recomputed: np.ndarray) -> np.ndarray:
        """Indices into ``pulls`` of the pulls a decision makes: ``by`` recomputed, and neither
        ``target`` nor any interior value saved."""
        a = self._pull_arrays
        interior_saved = np.bincount(a.owner, weights=saved[a.interior], minlength=len(a.by))
        return np.flatnonzero(recomputed[a.by] & ~saved[a.target] & (interior_saved == 0))

    def normalise(self, saved: np.ndarray) -> Decision:
        """The decision a save-set implies: far pulls cut (their targets saved), unneeded
        candidates not saved."""
        saved = np.asarray(saved, dtype=bool) | self.must_save
        while True:
            need = self.needed(saved)
            recomputed = need & ~saved
            active = self.active_pulls(saved, recomputed)
            forced = self._pull_arrays.target[active[self._pull_arrays.far[active]]]
            if not len(forced):
                break
            saved = saved.copy()
            saved[forced] = True
        saved = saved & need
        return Decision(saved=saved, recomputed=need & ~saved)

    def memory(self, decision: Decision) -> np.ndarray:
        """Bytes at every position under the linear model."""
        delta = np.zeros(self.num_positions + 1, dtype=np.int64)
        for i in np.flatnonzero(decision.saved):
            if self.need_end[i] > self.fwd_end[i]:
                delta[self.fwd_end[i] + 1] += self.size[i]
                delta[self.need_end[i] + 1] -= self.size[i]
        for i in np.flatnonzero(decision.recomputed):
            delta[self.need_start[i]] += self.again_size[i] + self.transient[i]
            delta[self.need_start[i] + 1] -= self.transient[i]
            delta[self.need_end[i] + 1] -= self.again_size[i]
        a = self._pull_arrays
        active = self.active_pulls(decision.saved, decision.recomputed)
        target, start = a.target[active], a.start[active]
        early = ~a.far[active] & (start < self.need_start[target])
        target, start = target[early], start[early]
        if len(target):
            earliest = np.full(self.num_candidates, np.iinfo(np.int64).max, dtype=np.int64)
            np.minimum.at(earliest, target, start)
            pulled = np.flatnonzero(earliest < np.iinfo(np.int64).max)
            np.add.at(delta, earliest[pulled], self.again_size[pulled])
            np.add.at(delta, self.need_start[pulled], -self.again_size[pulled])
        return self.base + np.cumsum(delta[:-1])

    def peak(self, decision: Decision) -> int:
        return int(self.memory(decision).max())

    def recompute_time(self, decision: Decision) -> float:
        return float(self.cost[decision.recomputed].sum() + self.save_cost[decision.saved].sum())

    def keep_interval(self, i: int) -> tuple[int, int]:
        return int(self.fwd_end[i]) + 1, int(self.need_end[i])

    def again_interval(self, i: int) -> tuple[int, int]:
        return int(self.need_start[i]), int(self.need_end[i])


@dataclasses.dataclass(frozen=True)
class _PullArrays:
    """``pulls`` as arrays, so a decision's active pulls are found without a Python loop."""

    by: np.ndarray
    target: np.ndarray
    start: np.ndarray
    far: np.ndarray
    interior: np.ndarray  # the interior values of every pull, concatenated
    owner: np.ndarray  # the pull each entry of ``interior`` belongs to

    @classmethod
    def of(cls, pulls: tuple[Pull, ...]) -> _PullArrays:
        def ints(values):
            return np.fromiter(values, dtype=np.int64)

        return cls(
            by=ints(p.by for p in pulls),
            target=ints(p.target for p in pulls),
            start=ints(p.start for p in pulls),
            far=np.fromiter((p.far for p in pulls), dtype=bool),
            interior=ints(j for p in pulls for j in p.interior),
            owner=ints(k for k, p in enumerate(pulls) for _ in p.interior),
        )


@dataclasses.dataclass(frozen=True)
class Decision:
    saved: np.ndarray  # bool per candidate
    recomputed: np.ndarray  # bool per candidate
