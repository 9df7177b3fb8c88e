"""Microbatch draws: the random ops of a microbatched step read the whole batch's values.

Eager PyTorch's whole-batch step draws its random ops (dropout's masks, ``rand_like``...) in
forward order, each for the whole batch's shape, from the global generator; their values depend on
the generator, the shape, the dtype and the op's parameters, never on the input's values, and no
other op of the step consumes random numbers. A step run as k microbatches that draws per
microbatch gets values of the same distribution but not eager's. This pass makes it exact: each
random op of the planned (microbatch-sized) joint graph becomes a read, ``fxmem::microbatch_draw``,
of the step's draw cache (:class:`DrawStep`, made active by :func:`drawing` around the microbatch
loop). The step's first read draws every random op's whole-batch values, in eager's order, with
eager's op (:meth:`Draw.draw`), and keeps each microbatch's slice of them along the batch dim
(masks as bits, 8 a byte) until that microbatch ends; every read returns its microbatch's slice. The generator therefore ends the step where
eager's does, and a read the backward recomputes is just another read (nothing to replay).

``native_dropout(x, p)`` becomes ``x * mask * (1 / (1 - p))`` with ``mask`` a bool read: ATen's
own ``input.mul(mask).mul_(scale)``, bit for bit. The read is an opaque custom op with no tensor
input: Inductor calls it as a fallback kernel, and the planner may recompute it anywhere.

The draw cache is module-wide, not thread-local: autograd runs a CUDA backward (where a recomputed
read happens) on a device thread of its own. One microbatched step runs at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import operator
from collections.abc import Iterator, Sequence

import torch
import torch.fx

from fxmem.errors import MicrobatchError
from fxmem.graph.ops import base_name, schema_arguments
from fxmem.passes.base import GraphPass, PassInvariantError, StepGraphs
from fxmem.passes.rng_replay import is_random

__all__ = ["Draw", "DrawDecision", "DrawRecord", "DrawStep", "MicrobatchDraws", "cache_bytes",
           "draw_kind", "drawing", "microbatch_draw", "substitute_draws"]

log = logging.getLogger(__name__)

_MASKS = ("bernoulli", "dropout")  # kinds whose values are 0/1: kept as bits


@dataclasses.dataclass(frozen=True)
class Draw:
    """One random op of the whole batch's step, as eager PyTorch draws it. ``kind``:
    "bernoulli" (``params``: the probability of a one), "dropout" (``native_dropout``'s mask;
    the probability of a zero), "uniform" (low, high) or "normal" (mean, std). ``shape`` is the
    whole batch's, ``dtype`` the one eager draws into; ``dim`` carries the batch, ``rows`` rows
    per sample along it (``dim`` None: not batched, every microbatch reads all of it)."""

    node: str  # the random op in the whole batch's capture
    kind: str
    params: tuple[float, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    dim: int | None
    rows: int = 1

    @property
    def is_mask(self) -> bool:
        """Its values are 0/1: kept as bits."""
        return self.kind in _MASKS

    def cache_bytes(self, sizes: Sequence[int]) -> int:
        """Bytes the draw cache holds for it, at the first microbatch (a part per microbatch of
        ``sizes``; one for a draw with no batch dim): masks 8 values a byte."""
        parts = [self.part_shape(n) for n in sizes] if self.dim is not None else [self.shape]
        if self.is_mask:
            return sum(-(-math.prod(p) // 8) for p in parts)
        return sum(math.prod(p) for p in parts) * torch.empty((), dtype=self.dtype).element_size()

    def draw(self) -> torch.Tensor:
        """The whole batch's values, drawn as eager draws them: the same op on a contiguous tensor
        of the whole shape (a bernoulli on the CPU straight into bool: its draws do not depend on
        the dtype; elsewhere in eager's dtype, then made a bool mask)."""
        shape, device, cpu = self.shape, self.device, self.device.type == "cpu"
        if self.kind == "bernoulli":
            if cpu:
                return torch.empty(shape, dtype=torch.bool).bernoulli_(self.params[0])
            return torch.empty(shape, dtype=self.dtype, device=device).bernoulli_(
                self.params[0]).bool()
        if self.kind == "dropout":  # native_dropout's CPU mask is a bernoulli of 1 - p
            if cpu:
                return torch.empty(shape, dtype=torch.bool).bernoulli_(1.0 - self.params[0])
            return torch.ops.aten.native_dropout.default(
                torch.empty(shape, dtype=self.dtype, device=device), self.params[0], True)[1]
        values = torch.empty(shape, dtype=self.dtype, device=device)
        if self.kind == "uniform":
            return values.uniform_(*self.params)
        return values.normal_(*self.params)

    def part_shape(self, n: int) -> tuple[int, ...]:
        """The shape a microbatch of ``n`` samples reads."""
        if self.dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.dim] = n * self.rows
        return tuple(shape)


def draw_kind(node: torch.fx.Node) -> tuple[str, tuple[float, ...], torch.fx.Node] | None:
    """``(kind, params, the tensor whose shape it draws)`` of a random op this module can draw
    for the whole batch; None for any other op (one whose values depend on its input's, such as
    ``bernoulli(probabilities)``, a factory op with a size, an explicit generator)."""
    if not is_random(node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    args, name = schema_arguments(node), base_name(node.target).rstrip("_")
    overload, like = node.target._overloadname, node.args[0]
    if args.get("generator") is not None:
        return None
    if name == "bernoulli" and overload in ("p", "float"):
        return "bernoulli", (float(args["p"]),), like
    if name == "native_dropout" and args.get("train") is not False:
        return "dropout", (float(args["p"]),), like
    if name == "rand_like":
        return "uniform", (0.0, 1.0), like
    if name == "uniform" and overload == "default":
        return "uniform", (float(args["from"]), float(args["to"])), like
    if name == "randn_like":
        return "normal", (0.0, 1.0), like
    if name in ("normal", "normal_functional") and overload == "default":
        return "normal", (float(args["mean"]), float(args["std"])), like
    return None


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits: uint8, 8 values a byte, in its index order."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).view(torch.uint8)
    packed = bits[:, 0].clone()
    for i in range(1, 8):
        packed |= bits[:, i] << i
    return packed


def _unpack(packed: torch.Tensor, size: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The values :func:`_pack` packed, as a new contiguous tensor of ``size`` and ``dtype``."""
    shifts = _SHIFTS.get(packed.device)
    if shifts is None:
        shifts = _SHIFTS[packed.device] = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = packed.unsqueeze(1) >> shifts
    bits &= 1
    out = torch.empty(tuple(size), dtype=dtype, device=packed.device)
    out.view(-1).copy_(bits.view(-1)[:out.numel()])
    return out


def cache_bytes(draws: Sequence[Draw | None], sizes: Sequence[int]) -> int:
    """Bytes a step split into microbatches of ``sizes`` keeps for its draws (at most: the first
    microbatch's; 0 unsplit)."""
    if len(sizes) < 2:
        return 0
    return sum(d.cache_bytes(sizes) for d in draws if d is not None)


class DrawStep:
    """One microbatched step's draw cache: for each draw, its values for each microbatch of
    ``sizes`` (masks as bits), drawn at the step's first read; a microbatch's parts are freed when
    the next one starts (:meth:`at`)."""

    def __init__(self, draws: Sequence[Draw | None], sizes: Sequence[int]):
        self.draws, self.sizes = tuple(draws), tuple(int(n) for n in sizes)
        self.starts = [sum(self.sizes[:j]) for j in range(len(self.sizes))]
        self.parts: list[list[torch.Tensor | None] | None] | None = None
        self.j = 0

    def at(self, j: int) -> None:
        """Microbatch ``j`` runs now: the parts of the ones before it are freed."""
        self.j = int(j)
        for parts in self.parts or ():
            if parts is not None and len(parts) > 1:
                parts[:j] = [None] * j

    def _draw(self) -> None:
        """Every draw's whole-batch values, in order, split into their microbatches' parts."""
        self.parts = []
        for d in self.draws:
            if d is None:
                self.parts.append(None)
                continue
            values = d.draw()
            pieces = [values] if d.dim is None else [
                values.narrow(d.dim, start * d.rows, n * d.rows)
                for start, n in zip(self.starts, self.sizes)]
            self.parts.append([_pack(p) if d.is_mask else p.contiguous() if len(pieces) == 1
                               else p.clone(memory_format=torch.contiguous_format)
                               for p in pieces])
            del values, pieces
        log.debug("microbatch draws: %d drawn for the whole batch (%d bytes kept)",
                  sum(d is not None for d in self.draws),
                  sum(d.cache_bytes(self.sizes) for d in self.draws if d is not None))

    def read(self, slot: int, size: Sequence[int], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        """The running microbatch's part of slot ``slot``, a new tensor; the first read of the
        step draws every slot, in order."""
        if self.parts is None:
            self._draw()
        draw = self.draws[slot] if 0 <= slot < len(self.draws) else None
        if draw is None:
            raise MicrobatchError(f"the step reads random draw {slot}, which it does not draw")
        parts = self.parts[slot]
        part = parts[0] if draw.dim is None else parts[self.j]
        shape = draw.part_shape(self.sizes[self.j])
        if part is None or shape != tuple(size):
            raise MicrobatchError(
                f"random draw {slot} ({draw.node}): microbatch {self.j} of {list(self.sizes)} "
                f"reads shape {shape}, the graph wants {tuple(size)}"
                + (" after its part was freed" if part is None else ""))
        if draw.is_mask:
            return _unpack(part, size, dtype)
        return torch.empty(tuple(size), dtype=dtype, device=device).copy_(part)


_active: DrawStep | None = None


@contextlib.contextmanager
def drawing(draws: Sequence[Draw | None], sizes: Sequence[int]) -> Iterator[DrawStep]:
    """Make the draw cache of a step split into microbatches of ``sizes`` the one
    ``fxmem::microbatch_draw`` reads, until the block ends (the cache is freed then)."""
    global _active
    if _active is not None:
        raise MicrobatchError("a microbatched step with random draws is already running (in "
                              "another thread?): fxmem runs one at a time")
    _active = DrawStep(draws, sizes)
    try:
        yield _active
    finally:
        _active = None


@torch.library.custom_op("fxmem::microbatch_draw", mutates_args=())
def microbatch_draw(slot: int, size: list[int], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """The running microbatch's part of the step's random draw ``slot`` (see the module)."""
    if _active is None:
        raise MicrobatchError("fxmem::microbatch_draw runs inside a microbatched step only (the "
                              "graphs of fxmem.optimize's microbatch lever)")
    return _active.read(slot, size, dtype, device)


@microbatch_draw.register_fake
def _microbatch_draw_fake(slot, size, dtype, device):
    return torch.empty(size, dtype=dtype, device=device)


@dataclasses.dataclass(frozen=True)
class DrawDecision:
    """The pass's decision: the whole step's random ops in forward order (None: one not drawn for
    the whole batch, left to draw per microbatch) and the microbatch sizes."""

    draws: tuple[Draw | None, ...]
    sizes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class DrawRecord:
    substituted: tuple[tuple[str, int], ...]  # (random op of the graph, slot it reads)
    kept: tuple[str, ...]  # random ops left to draw per microbatch

    def summary(self) -> str:
        kept = f"; {len(self.kept)} drawn per microbatch" if self.kept else ""
        return (f"{len(self.substituted)} random ops read the whole batch's draws{kept}")


def _compatible(draw: Draw, kind: str, params: tuple[float, ...]) -> bool:
    """The graph's op draws what eager's whole-batch op drew (CPU eager dropout is a bernoulli
    of 1 - p; the compiled graph's is native_dropout)."""
    if (draw.kind, kind) == ("bernoulli", "dropout"):
        return draw.params == (1.0 - params[0],)
    return draw.kind == kind and draw.params == params


def _check_match(node: torch.fx.Node, draw: Draw, sizes: Sequence[int]) -> tuple[str, list[int]]:
    """The node's kind and output size; MicrobatchError unless it is ``draw`` for a microbatch."""
    kind, params, _ = draw_kind(node) or (None, (), None)
    val = node.meta["val"]
    out = val[0] if isinstance(val, (tuple, list)) else val
    size = list(out.shape)
    why = None
    if kind is None or not _compatible(draw, kind, params):
        why = f"it draws {kind or node.target} {params}, the whole batch {draw.kind} {draw.params}"
    elif kind in ("uniform", "normal") and out.dtype != draw.dtype:
        why = f"it draws {out.dtype}, the whole batch {draw.dtype}"
    elif not any(tuple(size) == draw.part_shape(n) for n in set(sizes)):
        why = f"its shape {tuple(size)} is no microbatch's part of the whole {draw.shape}"
    if why:
        raise MicrobatchError(f"cannot read the whole batch's random draw {draw.node} in {node.name}"
                              f": {why}; the step is not split exactly")
    return kind, size


def _read(graph: torch.fx.Graph, slot: int, size, dtype, device, node) -> torch.fx.Node:
    read = graph.call_function(torch.ops.fxmem.microbatch_draw.default,
                               (slot, size, dtype, device))
    for key in ("stack_trace", "nn_module_stack", "seq_nr"):
        if key in node.meta:
            read.meta[key] = node.meta[key]
    return read


def _substitute(gm: torch.fx.GraphModule, node: torch.fx.Node, slot: int, kind: str,
                size: list[int]) -> None:
    """Replace ``node`` by a read of ``slot`` (native_dropout: by ``x * mask * scale``)."""
    graph, val = gm.graph, node.meta["val"]
    out = val[0] if isinstance(val, (tuple, list)) else val
    with graph.inserting_before(node):
        if kind != "dropout":
            new = _read(graph, slot, size, out.dtype, out.device, node)
            new.meta["val"] = torch.empty_like(out, memory_format=torch.contiguous_format)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            return
        x, p = node.args[0], float(schema_arguments(node)["p"])
        scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)  # ATen's: p1m == 0 ? 0 : 1 / p1m
        mask = _read(graph, slot, size, torch.bool, out.device, node)
        mask.meta["val"] = val[1]
        kept = graph.call_function(torch.ops.aten.mul.Tensor, (x, mask))
        scaled = graph.call_function(torch.ops.aten.mul.Tensor, (kept, scale))
        kept.meta["val"], scaled.meta["val"] = out, out
        for n in (kept, scaled):
            n.meta.update({k: node.meta[k] for k in ("stack_trace", "nn_module_stack")
                           if k in node.meta})
    for user in list(node.users):
        if user.target is not operator.getitem:
            raise PassInvariantError(f"native_dropout {node.name} is read by {user.name}, not "
                                     "through getitem")
        user.replace_all_uses_with(scaled if user.args[1] == 0 else mask)
        graph.erase_node(user)
    graph.erase_node(node)


def substitute_draws(gm: torch.fx.GraphModule, decision: DrawDecision) -> DrawRecord:
    """Rewrite ``gm`` (a microbatch's joint or forward graph) in place: its random ops, matched
    in forward order with the whole step's, read the whole batch's draws (see the module);
    MicrobatchError where they do not match (the split would not be exact)."""
    randoms = [n for n in gm.graph.nodes if is_random(n)]
    if len(randoms) != len(decision.draws):
        raise MicrobatchError(
            f"the microbatch's graph has {len(randoms)} random ops, the whole batch's step "
            f"{len(decision.draws)}: fxmem cannot tell which whole-batch draw each one reads, so "
            "the step is not split exactly")
    substituted, kept = [], []
    for slot, (node, draw) in enumerate(zip(randoms, decision.draws)):
        if draw is None:
            kept.append(node.name)
            continue
        kind, size = _check_match(node, draw, decision.sizes)
        substituted.append((node.name, slot))
        _substitute(gm, node, slot, kind, size)
    left = [n.name for n in gm.graph.nodes if is_random(n)]
    if left != kept:
        raise PassInvariantError(f"microbatch draws: random ops {left[:3]} left, {kept[:3]} "
                                 "expected (the ones not drawn for the whole batch)")
    gm.graph.lint()
    gm.recompile()
    return DrawRecord(tuple(substituted), tuple(kept))


class MicrobatchDraws(GraphPass):
    """The draw substitution as a :class:`~fxmem.passes.base.GraphPass`: the joint graph (or
    the forward) rewritten in place, a :class:`DrawDecision` in, a :class:`DrawRecord` out."""

    name = "microbatch-draws"

    def run(self, graphs: StepGraphs, decision: DrawDecision) -> tuple[StepGraphs, DrawRecord]:
        gm = graphs.joint if graphs.joint is not None else graphs.forward
        if gm is None:
            raise ValueError("the microbatch-draws pass needs the joint or the forward graph")
        return graphs, substitute_draws(gm, decision)
