"""Adapter: a labelled joint graph -> :class:`~fxmem.solver.RecomputeProblem`, and back.

Candidates are the storages forward ops create that the step does not keep anyway (parameters,
inputs and outputs are kept). Each is named by the node that creates it (a getitem for a
multi-output op). Views are never candidates: they are remade from their base for free.

- ``never_save``: a pointwise op's output read only by pointwise forward ops, never directly by
  the backward -- Inductor fuses it into its consumer, so saving it alone is never worth it;
- ``must_save``: outputs of random ops (unless the pass can replay their RNG state), of in-place
  or mutating ops, and of ops with no tensor metadata.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Mapping

import numpy as np
import torch
import torch.fx

from fxmem.graph.capture import CapturedStep
from fxmem.graph.ops import writes_argument
from fxmem.graph.torch_compat import is_op_overload
from fxmem.memory.inductor import Lowered, optimizes_layout
from fxmem.memory.lowering import lower_table, op_kinds
from fxmem.memory.simulation import simulate
from fxmem.planning.options import LOWERINGS
from fxmem.passes.rng_replay import is_random, is_replayable
from fxmem.solver.problem import Pull, RecomputeProblem
from fxmem.memory.storages import StorageTable, joint_table

__all__ = ["ProblemMap", "build_problem", "saved_nodes"]

_BLOCK_RE = re.compile(r"^(.*?\.\d+)(?:\.|$)")  # "model.blocks.3.attn" -> "model.blocks.3"


@dataclasses.dataclass(frozen=True)
class ProblemMap:
    problem: RecomputeProblem
    candidate_nodes: tuple[str, ...]  # candidate index -> node name
    labels: tuple[str, ...] = ()  # position -> the joint graph's op (or epilogue point) there


def _tag(node: torch.fx.Node | None, tag) -> bool:
    return node is not None and is_op_overload(node.target) and tag in node.target.tags


def _block_of(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, _ in stack.values():
        match = _BLOCK_RE.match(str(path).replace("L['self'].", "").replace("L__self___", ""))
        if match:
            return match.group(1)
    return None


def build_problem(
    step: CapturedStep,
    costs: Mapping[str, float],
    *,
    constant: Mapping[str, int] | None = None,
    epilogue=(),
    backward_constant: Mapping[str, int] | None = None,
    replay_random: bool = False,
    pull_window: int | None = None,
    lowering: str = "eager",
    fused_cost=None,
    save_cost: Mapping[str, float] | None = None,
    saveable: frozenset[str] = frozenset(),
) -> ProblemMap:
    """The recompute problem of a captured (joint) step. ``costs`` maps node names to seconds.

    ``pull_window``: how many backward positions earlier than its own need a value may be
    recomputed for another's recomputation (default: an eighth of the backward, at least 64);
    farther pulls are cut by saving a value on the way.

    ``lowering="inductor"`` models the step as Inductor runs it (:mod:`fxmem.memory.lowering`):
    values Inductor inlines into their consumers never exist in memory, and their cost --
    ``fused_cost(node)``, seconds (default: ``costs``), e.g. arithmetic alone -- is charged to
    the realised values whose kernels compute them. An inlined forward value the backward reads
    is an *optional* candidate: by default the backward's kernels compute it again from its
    inputs, which live until its last reader (a residual sum keeps every term of the sum alive);
    saving it realises it in the forward and frees its inputs early (as eager autograd and the
    min-cut partitioner do). Saving all of them is the unoptimised step; not saving one costs no
    memory of its own (``again_size`` 0) but reads its inputs again.

    ``save_cost``: seconds saving a named candidate costs (a value stored in fewer bits pays its
    casts, :mod:`fxmem.levers.precision.stored`); recomputing such a candidate is free (the
    backward then reads the value it was cast from). ``saveable``: values never marked
    never-save, though the backward reads them only through such a candidate (the values cast
    from: unless stored low, the backward reads them).
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")
    # the joint graph as the plan's graphs will run: FX code, or Inductor's rules
    # (:mod:`fxmem.memory.lowering`, the same the plan's check applies); Inductor's layout
    # optimisation runs the convolutions (and their gradients) channels-last
    layout = lowering == "inductor" and optimizes_layout(step.gm)
    table = joint_table(step, lowering="eager", channels_last=layout)
    costs = dict(costs)
    save_cost = dict(save_cost or {})
    costs.update({name: 0.0 for name in save_cost})
    optional: dict[int, tuple[int, float]] = {}  # inlined value -> (bytes if realised, cost)
    input_reads = table.storages.reads  # what each op reads, for what recomputing it needs
    if lowering == "inductor":
        table, costs, optional, input_reads = _lowered(table, costs, fused_cost, layout)
    storages = table.storages
    timeline = simulate(storages, constant=constant, epilogue=epilogue,
                        backward_constant=backward_constant)
    c = _candidates(step, table, input_reads, optional)
    _date_needs(c)
    # where what dies at each position is freed (later than its last read in a kernel group)
    release = np.array(storages.release_after or range(len(storages.op_names)), dtype=np.int64)
    c.fwd_end = release[c.fwd_end]
    c.need_end = np.where(c.need_end >= 0, release[np.maximum(c.need_end, 0)], -1)
    if pull_window is None:
        pull_window = max(64, (len(storages.op_names) - storages.backward_start) // 8)
    pulls = _pulls(len(c.cands), c.inputs, c.direct, c.need_start, c.need_end, pull_window)
    keep_idx = np.flatnonzero(c.need_end >= 0)
    traits = _traits(c, keep_idx, table, costs, optional, replay_random, saveable)
    problem = _kept_problem(c, keep_idx, traits, pulls, _base(timeline, c, release),
                            storages.backward_start, save_cost)
    return ProblemMap(problem=problem, candidate_nodes=problem.names, labels=timeline.labels)


def _kept_problem(c, keep_idx, traits: dict, pulls, base, backward_start: int,
                  save_cost: Mapping[str, float]) -> RecomputeProblem:
    """The problem over the candidates ``keep_idx`` (those the backward reads), renumbered."""
    remap = {int(old): new for new, old in enumerate(keep_idx)}
    return RecomputeProblem(
        names=tuple(c.creator[c.cands[k]] for k in keep_idx),
        size=c.size[keep_idx],
        cost=traits["cost"],
        fwd_end=c.fwd_end[keep_idx],
        need_start=c.need_start[keep_idx],
        need_end=c.need_end[keep_idx],
        direct=c.direct[keep_idx],
        inputs=tuple(tuple(remap[j] for j in c.inputs[k] if j in remap) for k in keep_idx),
        must_save=traits["must_save"],
        never_save=traits["never_save"],
        base=base,
        backward_start=backward_start,
        block=traits["block"],
        transient=traits["transient"],
        save_cost=np.array([save_cost.get(c.creator[c.cands[k]], 0.0) for k in keep_idx],
                           dtype=np.float64),
        lossy=np.array([c.creator[c.cands[k]] in save_cost for k in keep_idx], dtype=bool),
        again_size=np.where(c.fused[keep_idx], 0, c.size[keep_idx]),
        pulls=tuple(
            Pull(remap[p.target], remap[p.by], p.start,
                 tuple(remap[j] for j in p.interior if j in remap), p.far)
            for p in pulls if p.target in remap and p.by in remap
        ),
    )


@dataclasses.dataclass
class _Candidates:
    """The forward values a plan may save or recompute, each with where it is made, read and
    needed (positions of the lowered table), before the unneeded ones are dropped."""

    cands: list[int]  # storage ids
    creator: dict[int, str]  # storage -> the node that names it
    readers: dict[int, list[int]]  # storage -> the positions that read it
    held: np.ndarray  # bytes in the timeline
    size: np.ndarray  # bytes if saved (an inlined value's when realised)
    fused: np.ndarray  # an inlined value (optional: not saving it costs no memory of its own)
    producer: np.ndarray
    fwd_reads: list[list[int]]
    bwd_reads: list[list[int]]
    fwd_end: np.ndarray
    direct: np.ndarray  # read by the backward itself
    need_start: np.ndarray
    need_end: np.ndarray
    inputs: list[tuple[int, ...]]  # candidates each one's recomputation reads
    op_nodes: tuple = ()


def _candidates(step: CapturedStep, table: StorageTable, input_reads, optional) -> _Candidates:
    """Candidates are the storages forward ops create that the step does not keep anyway, named
    by the node that creates each (a getitem for a multi-output op)."""
    storages = table.storages
    nodes = {n.name: n for n in step.gm.graph.nodes}
    op_nodes = table.op_nodes  # None: an op the lowering adds (Inductor's channels-last copies)
    position = {name: i for i, name in enumerate(storages.op_names)}
    n_fwd = storages.backward_start
    creator: dict[int, str] = {}
    for i, created in enumerate(storages.creates):
        for s in created:
            if op_nodes[i] is not None:
                creator[s] = op_nodes[i].name
    for node in step.gm.graph.nodes:  # multi-output ops: name each storage by its getitem
        if node.op == "call_function" and node.target is operator.getitem:
            for s in storages.node_storages.get(node.name, ()):
                if creator.get(s) == node.args[0].name:
                    creator[s] = node.name
    readers: dict[int, list[int]] = {}
    for i, read in enumerate(storages.reads):
        for s in read:
            readers.setdefault(s, []).append(i)
    kept = storages.pinned | storages.resident
    cands = [s for s, op in sorted(creator.items(), key=lambda kv: position.get(kv[1], 0))
             if s not in kept and _op_position(creator[s], nodes, position) < n_fwd]
    index = {s: k for k, s in enumerate(cands)}
    producer = np.array([_op_position(creator[s], nodes, position) for s in cands])
    fwd_reads = [[p for p in readers.get(s, []) if p < n_fwd] for s in cands]
    bwd_reads = [[p for p in readers.get(s, []) if p >= n_fwd] for s in cands]
    big = np.iinfo(np.int64).max
    return _Candidates(
        cands=cands, creator=creator, readers=readers,
        held=np.array([storages.nbytes[s] for s in cands], dtype=np.int64),
        size=np.array([optional[s][0] if s in optional else storages.nbytes[s] for s in cands],
                      dtype=np.int64),
        fused=np.array([s in optional for s in cands], dtype=bool),
        producer=producer, fwd_reads=fwd_reads, bwd_reads=bwd_reads,
        fwd_end=np.array([max([producer[k], *fwd_reads[k]]) for k in range(len(cands))],
                         dtype=np.int64),
        direct=np.array([bool(r) for r in bwd_reads]),
        need_start=np.array([min(r) if r else big for r in bwd_reads], dtype=np.int64),
        need_end=np.array([max(r) if r else -1 for r in bwd_reads], dtype=np.int64),
        inputs=[tuple(sorted({index[t] for t in input_reads[producer[k]]
                              if t in index and t != s})) for k, s in enumerate(cands)],
        op_nodes=op_nodes,
    )


def _date_needs(c: _Candidates) -> None:
    """When each candidate is needed in the backward. A value the backward reads is made (saved or
    recomputed) for its first read. A value only a recomputation reads is needed when its
    consumers are first needed: propagate through such values only, consumers first.
    Propagating through directly-read values too would date every value back to the first
    backward op (recompute the loss -> the logits -> ... -> layer 0). A fused consumer is
    computed again inside each of its readers: its inputs live to its end."""
    consumers: dict[int, list[int]] = {}
    for k in range(len(c.cands)):
        for j in c.inputs[k]:
            consumers.setdefault(j, []).append(k)
    for k in sorted(range(len(c.cands)), key=lambda k: -c.producer[k]):
        users = [u for u in consumers.get(k, ()) if c.need_end[u] >= 0]
        if not users:
            continue
        if not c.direct[k]:
            c.need_start[k] = min(c.need_start[u] for u in users)
        c.need_end[k] = max(c.need_end[k], max(c.need_end[u] if c.fused[u] else c.need_start[u]
                                               for u in users))


def _traits(c: _Candidates, keep_idx, table: StorageTable, costs, optional,
            replay_random: bool, saveable: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Per kept candidate: its recompute cost, must-save and never-save flags, block and the
    scratch its op makes again when recomputed."""
    storages = table.storages
    must_save, never_save, cost, block_names, transient = [], [], [], [], []
    for k in keep_idx:
        s = c.cands[k]
        op = c.op_nodes[c.producer[k]]
        # what the op allocates that nothing reads: its scratch, made again when it is recomputed
        transient.append(sum(storages.nbytes[t] for t in storages.creates[c.producer[k]]
                             if t != s and t not in c.readers))
        replayable = replay_random and is_replayable(op)
        must_save.append((is_random(op) and not replayable) or writes_argument(op)
                         or not isinstance(op.meta.get("val"), (torch.Tensor, tuple, list)))
        consumers = [c.op_nodes[p] for p in c.fwd_reads[k]]
        never_save.append(
            not must_save[-1] and not c.direct[k] and c.creator[s] not in saveable
            and _tag(op, torch.Tag.pointwise)
            and all(_tag(u, torch.Tag.pointwise) for u in consumers)
        )
        cost.append(optional[s][1] if s in optional else float(costs.get(op.name, 0.0)))
        block_names.append(_block_of(op))
    blocks = {b: i for i, b in enumerate(dict.fromkeys(b for b in block_names if b))}
    return {"must_save": np.array(must_save, dtype=bool),
            "never_save": np.array(never_save, dtype=bool),
            "cost": np.array(cost, dtype=np.float64),
            "block": np.array([blocks.get(b, -1) if b else -1 for b in block_names],
                              dtype=np.int64),
            "transient": np.array(transient, dtype=np.int64)}


def _base(timeline, c: _Candidates, release: np.ndarray) -> np.ndarray:
    """The joint timeline minus every candidate's life past its forward use."""
    total = timeline.total.astype(np.int64)
    delta = np.zeros(len(total) + 1, dtype=np.int64)
    for k in range(len(c.cands)):
        last = max(c.fwd_end[k], release[max(c.bwd_reads[k])] if c.bwd_reads[k] else -1)
        if last > c.fwd_end[k]:
            delta[c.fwd_end[k] + 1] -= c.held[k]
            delta[last + 1] += c.held[k]
    return total + np.cumsum(delta[:-1])


def _lowered(table: StorageTable, costs: dict[str, float], fused_cost, layout: bool):
    """The joint table as Inductor runs it; costs with each inlined op's cost charged to the ops
    that read it (through other inlined ops); the optional candidates (inlined forward values the
    backward reads: storage -> (bytes, seconds to compute again)); and each op's reads with those
    values unexpanded (what recomputing the op needs)."""
    kinds = op_kinds(table)
    inlined_cost: dict[str, float] = {}
    for node, kind in zip(table.op_nodes, kinds):
        body = sum(inlined_cost.get(inp.name, 0.0) for inp in node.all_input_nodes)
        if kind in (Lowered.INLINED, Lowered.VIEW):
            own = costs.get(node.name, 0.0) if fused_cost is None else fused_cost(node)
            inlined_cost[node.name] = body + own
        else:
            costs[node.name] = costs.get(node.name, 0.0) + body
    storages = table.storages
    n_fwd = storages.backward_start
    read_in_backward = {s for read in storages.reads[n_fwd:] for s in read}
    kept = storages.pinned | storages.resident
    # recomputing one in the backward's kernels reads its inputs again: priced as its own kernel
    optional = {
        s: (storages.nbytes[s], costs.get(node.name, 0.0))
        for i, node in enumerate(table.op_nodes[:n_fwd])
        if kinds[i] is Lowered.INLINED and not is_random(node)
        for s in storages.creates[i] if s in read_in_backward and s not in kept
    }
    unexpanded = frozenset(optional)
    lowered = lower_table(table, layout_optimized=layout, unexpanded=unexpanded, from_op=n_fwd)
    input_reads = lower_table(table, layout_optimized=layout, unexpanded=unexpanded).storages.reads
    return lowered, costs, optional, input_reads


def _pulls(n, inputs, direct, need_start, need_end, window) -> list[Pull]:
    """For every needed candidate m, the candidates its recomputation reads (through unsaved
    values) earlier than their own first need."""
    pulls = []
    for m in range(n):
        if need_end[m] < 0:
            continue
        start = int(need_start[m])
        seen = {m}
        stack = [(j, ()) for j in inputs[m]]
        while stack:
            j, path = stack.pop()
            if j in seen:
                continue
            seen.add(j)
            if need_end[j] < 0 or need_start[j] <= start:
                continue  # made before m is: its own reads keep it alive
            far = need_start[j] - start > window
            pulls.append(Pull(target=j, by=m, start=start, interior=path, far=far))
            if not far:
                stack.extend((k, path + (j,)) for k in inputs[j])
    return pulls


def _op_position(name: str, nodes, position) -> int:
    node = nodes[name]
    if node.target is operator.getitem:
        return position[node.args[0].name]
    return position[name]


def saved_nodes(pmap: ProblemMap, saved: np.ndarray) -> list[str]:
    """Names of the candidate nodes a decision saves."""
    return [pmap.candidate_nodes[i] for i in np.flatnonzero(saved)]
