"""One rank's memory through an FSDP2 step: the root's eager code, the planned unit graphs and
what ``fully_shard`` holds between them, stitched into one list of points.

Under ``fully_shard`` (torch 2.13) each unit's hooks run outside TorchDynamo, so a step is not one
graph: each unit (a transformer block) is its own compiled graph, planned by fxmem, and the root's
own code (embeddings, the head, the loss) runs eagerly between them. The model of the step is

- the root's eager step, captured by fxmem with every unit replaced by a stub op
  (``fxmem::fsdp_unit``, a new tensor of its input's shape, and the same for its gradient) and
  simulated as the autograd engine runs it (:func:`fxmem.estimate`'s model): the root's own
  parameters at full size (FSDP2 keeps the root all-gathered from its pre-forward to the end of
  the backward), its gradients at full size until their reduce-scatter at the end, the inputs
  and the activations between units;
- each unit's planned graph (:class:`~fxmem.memory.simulation.MemoryTimeline` of its plan: its
  all-gathered parameters, its input, saved values, gradients and temporaries), put where the
  stub's forward and backward run, with the bytes every unit before it saved for its backward;
- what FSDP2 holds (measured in the allocator on 2 gloo ranks, torch 2.13): the parameter shards
  (resident); a unit's all-gather output (``world`` x its padded shard) beside its unsharded
  parameters while it copies out, plus a copy of the same size while gloo gathers; in the
  backward, the all-gather output of the next unit (prefetched when a unit's backward starts,
  and the last unit's when the root's backward starts), and the reduce-scatter input of the
  unit before (freed only at the next reduce-scatter), the new gradient shard (``1/world``).
  A prefetch runs on gloo's thread while the backward goes on, and its copy of the output's
  size may be alive at any point until it ends: the prediction leaves it out (it ended first in
  the runs measured) and the bound the plan keeps under the budget counts it;
- the optimizer, when one is given (:class:`RankOptimizer`): its state over the rank's parameter
  shards (``exp_avg`` and ``exp_avg_sq``, or SGD's momentum, ``1/world`` of each parameter) held
  throughout -- the steady state; the first ``step()`` allocates the same bytes -- and a last
  point, ``optimizer.step()``: after the backward FSDP2 has resharded every parameter and
  reduce-scattered every gradient, so the rank holds its parameter shards, its gradient shards,
  the inputs and outputs, the state and the step's temporaries.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from fxmem.memory.simulation import Category, MemoryTimeline

__all__ = ["fsdp_unit", "UnitStub", "RootStep", "UnitSizes", "unit_sizes", "capture_root",
           "RankOptimizer", "stitch", "Stitched"]

log = logging.getLogger(__name__)


@torch.library.custom_op("fxmem::fsdp_unit", mutates_args=())
def fsdp_unit(x: torch.Tensor) -> torch.Tensor:
    """Where an FSDP unit runs, in the root's captured step: a new tensor of ``x``'s shape."""
    return x.clone()


@fsdp_unit.register_fake
def _(x):
    return torch.empty_like(x)


def _unit_backward(ctx, grad):
    return fsdp_unit(grad)


fsdp_unit.register_autograd(_unit_backward)


class UnitStub(torch.nn.Module):
    """Stands for a unit in the root's captured step: one tensor in, one of its shape out."""

    def __init__(self, name: str):
        super().__init__()
        self.unit_name = name

    def forward(self, x, *args, **kwargs):
        if args or kwargs or not isinstance(x, torch.Tensor):
            raise NotImplementedError(
                f"fxmem plans FSDP2 units that take one tensor and return one tensor of its "
                f"shape (a transformer block); {self.unit_name} is called with more")
        return fsdp_unit(x)


@dataclasses.dataclass(frozen=True)
class UnitSizes:
    """Bytes of one unit's FSDP2 buffers on a rank."""

    gathered: int  # all-gather output and reduce-scatter input: world x its padded shard
    shard: int  # its padded shard (a reduce-scatter output: the gradient shard)


def unit_sizes(params, world: int) -> UnitSizes:
    """The all-gather and reduce-scatter sizes FSDP2 allocates for a unit with ``params`` (their
    full shapes): each parameter's dim 0 padded to a multiple of ``world``."""
    total = 0
    for p in params:
        rows = -(-p.shape[0] // world) * world if p.dim() else world
        total += rows * (p.numel() // max(p.shape[0], 1) if p.dim() else 1) * p.element_size()
    return UnitSizes(gathered=total, shard=total // world)


@dataclasses.dataclass(frozen=True)
class RootStep:
    """The root's eager step with the units stubbed: its timeline, where each unit's forward and
    backward run (point indices, in call order), and the bytes of the tensor a unit passes on."""

    timeline: MemoryTimeline
    forward_at: tuple[int, ...]
    backward_at: tuple[int, ...]  # unit k's backward (same order as forward_at)
    activation: int


def capture_root(stubbed: torch.nn.Module, args, kwargs, loss_fn=None) -> RootStep:
    """Capture ``stubbed`` (the root with its units replaced by :class:`UnitStub`) and simulate
    its step as eager PyTorch runs it."""
    from fxmem.api.estimate import estimate_captured
    from fxmem.graph.capture import capture_step

    step = capture_step(stubbed, tuple(args), dict(kwargs), loss_fn=loss_fn)
    est = estimate_captured(step, stubbed)
    timeline = est.timeline
    stub = torch.ops.fxmem.fsdp_unit.default
    nodes = [n for n in step.gm.graph.nodes if n.op == "call_function" and n.target is stub]
    where = {label: i for i, label in enumerate(timeline.labels)}
    points = [where[n.name] for n in nodes if n.name in where]
    if len(points) != len(nodes) or len(points) % 2:
        raise NotImplementedError("fxmem could not find each FSDP unit's forward and backward "
                                  "in the root's captured step")
    half = len(points) // 2
    forward_at, backward_at = points[:half], points[half:][::-1]
    if any(i >= timeline.backward_start for i in forward_at) or any(
            i < timeline.backward_start for i in backward_at):
        raise NotImplementedError("the root's step runs an FSDP unit's backward before another "
                                  "unit's forward: fxmem plans units called once each, in order")
    val = nodes[0].meta.get("val")
    activation = int(val.untyped_storage().nbytes()) if isinstance(val, torch.Tensor) else 0
    return RootStep(timeline, tuple(forward_at), tuple(backward_at), activation)


@dataclasses.dataclass(frozen=True)
class RankOptimizer:
    """A rank's optimizer over its parameter shards (:func:`fxmem.memory.optimizer.optimizer_memory`
    of the FSDP2-sharded parameters, which counts each ``DTensor`` at its local shard)."""

    name: str  # e.g. "AdamW (single-tensor)"
    state: int  # its state on this rank: held from the first step() on
    step: int  # the most bytes of step()'s temporaries alive at once
    gradients: int  # the gradient shards step() reads: every parameter's, padded as FSDP2 pads


@dataclasses.dataclass(frozen=True)
class Stitched:
    """The rank's predicted step: its peak, where, and what holds it."""

    peak: int  # predicted
    bound: int  # the largest point with a prefetch's copy in flight counted: kept under budget
    at: str
    breakdown: dict[str, int]
    saved_per_unit: int
    points: tuple[tuple[str, int], ...]


def _col(category: Category) -> int:
    return list(Category).index(category)


def stitch(root: RootStep, unit: MemoryTimeline, sizes: UnitSizes, *, units: int,
           resident: int, optimizer: RankOptimizer | None = None) -> Stitched:
    """The peak of one rank's FSDP2 step: the root's eager timeline, ``units`` identical units
    whose planned graph is ``unit``, FSDP2's buffers of ``sizes`` per unit, and ``resident``
    bytes held throughout beside the root's timeline (the parameter shards); with ``optimizer``,
    its state held throughout and its ``step()`` after the backward."""
    rt, n, a = root.timeline, units, root.activation
    total = rt.live.sum(axis=1).astype(np.int64)
    bbs = unit.backward_start
    ut = unit.live.astype(np.int64)
    u_params = int(ut[0, _col(Category.PARAMETERS)])
    end_fw = max(bbs - 1, 0)
    saved = int(ut[end_fw, _col(Category.SAVED)] + ut[end_fw, _col(Category.INPUTS)])
    grads_end = int(ut[-1, _col(Category.GRADIENTS)])
    g, s = sizes.gathered, sizes.shard
    points: list[tuple[str, int, dict[str, int]]] = []

    bounds: list[int] = []
    state = optimizer.state if optimizer is not None else 0

    def add(label, own, in_flight=0, **held):
        held = {k: int(v) for k, v in {"optimizer_state": state, **held}.items() if v}
        points.append((label, int(own) + resident + sum(held.values()), held))
        bounds.append(points[-1][1] + int(in_flight))

    done_fw = {i: k + 1 for k, i in enumerate(root.forward_at)}
    stubs = set(root.forward_at) | set(root.backward_at)
    first_bw_unit = root.backward_at[-1] if root.backward_at else rt.backward_start
    # the root's own points, with what the units hold there
    for t in range(len(rt.labels)):
        if t in stubs:
            continue
        ran = sum(1 for i in root.forward_at if i < t)
        back = sum(1 for i in root.backward_at if i < t)
        label = f"root: {rt.labels[t]}"
        if t < rt.backward_start or back == 0:
            prefetch = g if t >= rt.backward_start and n else 0
            add(label, total[t], saved_by_units=(ran - back) * saved, prefetched=prefetch,
                in_flight=prefetch)
        else:  # after units' backward: their gradient shards, the last reduce-scatter input
            add(label, total[t], saved_by_units=(ran - back) * saved, gradient_shards=back * s,
                reduce_scatter=g)
    del done_fw, first_bw_unit
    for k, i in enumerate(root.forward_at):
        base = total[i] - 2 * a
        add(f"unit {k} all-gather", base + a, saved_by_units=k * saved, all_gather=2 * g)
        add(f"unit {k} copy-out", base + a + u_params, saved_by_units=k * saved, all_gather=g)
        for p in range(bbs):
            add(f"unit {k} forward: {unit.labels[p]}", base + ut[p].sum(),
                saved_by_units=k * saved)
    for k, i in reversed(list(enumerate(root.backward_at))):
        base = total[i] - 2 * a
        later = n - 1 - k
        rs_prev = g if k < n - 1 else 0
        prefetch = g if k > 0 else 0  # its output (and gloo's copy while it is in flight)
        add(f"unit {k} backward copy-out", base + a + saved + u_params,
            saved_by_units=k * saved, gradient_shards=later * s, reduce_scatter=rs_prev,
            all_gather=g)
        for p in range(bbs, len(unit.labels)):
            own = ut[p].sum() - ut[p, _col(Category.OUTPUTS)]
            add(f"unit {k} backward: {unit.labels[p]}", base + own,
                saved_by_units=k * saved, gradient_shards=later * s, reduce_scatter=rs_prev,
                prefetched=prefetch, in_flight=prefetch)
        add(f"unit {k} reduce-scatter", base + a + grads_end, saved_by_units=k * saved,
            gradient_shards=later * s, reduce_scatter=g, prefetched=prefetch)
        add(f"unit {k} reduce-scatter copy", base + a, saved_by_units=k * saved,
            gradient_shards=(later + 1) * s, reduce_scatter=2 * g, prefetched=prefetch)
    if optimizer is not None:  # every parameter resharded, every gradient reduce-scattered
        last = rt.live[-1].astype(np.int64)
        own = sum(int(last[_col(c)]) for c in (Category.INPUTS, Category.OUTPUTS,
                                                Category.BUFFERS))
        add("optimizer.step()", own, gradient_shards=optimizer.gradients,
            optimizer_step=optimizer.step)
    label, peak, held = max(points, key=lambda x: x[1])
    return Stitched(peak, max(bounds), label, {"resident shards": resident, **held}, saved,
                    tuple((lbl, b) for lbl, b, _ in points))
