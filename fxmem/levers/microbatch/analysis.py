"""Can a training step be split into microbatches exactly, and how are they weighted?

The microbatch lever runs a step as k smaller forward+backward passes whose gradients are summed.
That is exact only when (1) no forward op mixes samples (BatchNorm in training mode, a mean over
the batch that feeds the rest of the network) and (2) the loss is a known weighted average over
the batch, so that ``sum_j w_j * loss_j / sum_j w_j`` is the whole batch's loss and gradient.
:func:`analyze_batch` checks both on a :class:`~fxmem.graph.capture.CapturedStep`: the batch dim of
every input, then of every forward value and the ops that mix samples
(:mod:`fxmem.batch_propagation`), then the chain of ops linear in the loss back to its reduction
over the batch, and a function giving each microbatch's weight from its inputs alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import torch
import torch.fx

from fxmem.graph import torch_compat
from fxmem.graph.torch_compat import pytree
from fxmem.levers.microbatch.ops import LOSS_OPS, NLL_OPS, Problem, op_kwargs, op_name
from fxmem.levers.microbatch.propagation import Propagation
from fxmem.graph.capture import CapturedStep, Role
from fxmem.levers.microbatch.draws import whole_draw
from fxmem.passes.microbatch_draws import Draw
from fxmem.passes.rng_replay import is_random
from fxmem.errors import StepInputError

__all__ = ["BatchAnalysis", "Coupling", "analyze_batch"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Coupling:
    """A forward op that mixes samples. ``kind``: "batch_norm" (BatchNorm in training mode),
    "batch_reduction" (a reduction, contraction or normalisation over the batch), "batch_mixing"
    (samples combined otherwise: reordered, sliced, reshaped apart), "random" (a random draw the
    microbatches cannot read from the whole batch's draws -- see ``BatchAnalysis.draws`` -- so
    each would draw other values than the whole batch under the same seed) or "unsupported_op" (an op the rules do not know, fed a batched
    value: the analysis is conservative)."""

    node: str
    kind: str
    op: str
    source: str  # the user's line, "file:line (code)", or "" when the capture kept no stack trace
    detail: str = ""
    momentum: float | None = None  # BatchNorm's momentum (None: cumulative average)

    def __str__(self) -> str:
        where = f" at {self.source}" if self.source else ""
        return f"{self.op} ({self.kind}){where}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class BatchAnalysis:
    """What :func:`analyze_batch` found. ``input_paths`` is the step's flat input order (the
    tensors ``fxmem.optimize`` passes); ``weight_fn(mb_inputs)`` takes a microbatch's tensors in
    that order and returns its weight as a float tensor (elements for "mean", non-ignored targets
    for "mean_over_targets", 1 for "sum")."""

    batch_size: int
    batch_dims: Mapping[str, int | None]
    input_paths: tuple[str, ...]
    reduction: str | None  # "mean" | "sum" | "mean_over_targets" | None
    coupling: tuple[Coupling, ...]
    output_batch_dims: tuple[int | None, ...]  # per held output: the dim to concatenate along
    weight_fn: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None
    reason: str | None  # why microbatching is not exact, None when it is
    mutated_buffers: tuple[str, ...] = ()  # buffers the forward updates in place (BatchNorm's)
    # the forward's random ops in order, as whole-batch draws the microbatches read (None: one
    # that is not, a coupling); () when there is none to read
    draws: tuple[Draw | None, ...] = ()

    @property
    def exact(self) -> bool:
        return not self.coupling and self.reduction is not None

    @property
    def flat_batch_dims(self) -> tuple[int | None, ...]:
        """The batch dim of each flat input tensor, in ``input_paths`` order."""
        return tuple(self.batch_dims[p] for p in self.input_paths)


def _source(node: torch.fx.Node) -> str:
    """The user's line: the last frame of the node's stack trace outside torch itself ("" when
    the capture recorded none)."""
    lines = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [(lines[i].strip(), lines[i + 1].strip() if i + 1 < len(lines) else "")
              for i in range(len(lines)) if lines[i].strip().startswith("File ")]
    if not frames:
        return ""
    head, code = ([f for f in frames if "/torch/" not in f[0].replace("\\", "/")] or frames)[-1]
    parts = head.split('"')
    where = f"{parts[1]}:{head.split('line ')[1].split(',')[0]}" if len(parts) > 2 else head
    return f"{where} ({code})" if code else where


_LINEAR = {"clone", "alias", "_to_copy", "view", "_unsafe_view", "reshape", "squeeze", "unsqueeze",
           "neg", "sum", "mean", "expand", "contiguous", "mul", "div", "add", "sub"}


def _batch_multiple(c: float, batch: int) -> bool:
    """Whether c or 1/c is a whole multiple of the batch size (likely read from a shape)."""
    for v in (c, 1 / c if c else 0):
        if batch > 1 and round(v) != 0 and abs(v - round(v)) < 1e-6 * abs(v) \
                and round(v) % batch == 0:
            return True
    return False


def _forward_users(step, node, chain) -> list[torch.fx.Node]:
    """Users that compute something in the forward from ``node`` (detach and the backward: not)."""
    found = []
    for u in node.users:
        if u.name in step.backward_nodes or u in chain or u.op == "output":
            continue
        if u.target is torch.ops.aten.detach.default:
            continue
        if u.target is operator.getitem:
            found += _forward_users(step, u, chain)
        else:
            found.append(u)
    return found


def _loss_chain(step, prop) -> tuple[torch.fx.Node | None, bool, str | None]:
    """Walk from the loss to the reduction over the batch through ops linear in it.
    Returns (the reduction node, whether a batch-independent term is added, why not)."""
    nodes = {n.name: n for n in step.gm.graph.nodes}
    n, chain, additive = nodes[step.loss_node], [], False
    while True:
        chain.append(n)
        if n in prop.problems and prop.problems[n].kind == "batch_reduction":
            break
        if n.target is operator.getitem:
            n = n.args[0]
            continue
        name = op_name(n)
        states = [(a, prop.state(a)) for a in pytree.tree_leaves(n.args)
                  if isinstance(a, torch.fx.Node) and prop.state(a) is not None]
        dep = [a for a, s in states if s.dim is not None or s.dep]
        if name not in _LINEAR or len(dep) != 1 or prop.state(dep[0]).dim is not None:
            return None, additive, (f"the loss is computed from the batch by {name}, not as a "
                                    "constant multiple of a mean or sum over the batch")
        if name == "div" and n.args[0] is not dep[0]:
            return None, additive, "the loss divides by a value computed from the batch"
        scale = next((c for c in n.args if isinstance(c, (int, float)) and name in ("mul", "div")
                      and _batch_multiple(c, prop.B)), None)
        if scale is not None:
            return None, additive, (
                f"the loss is scaled by {scale:g}, a multiple of the batch size {prop.B}: if it "
                "comes from the batch's shape (e.g. loss / x.shape[0]) each microbatch would "
                "scale by its own size instead; use a mean (reduction='mean') or another constant")
        additive |= name in ("add", "sub")
        n = dep[0]
    users = [u for c in chain for u in _forward_users(step, c, set(chain))]
    if users:
        return None, additive, (f"the loss's reduction over the batch ({n.name}) also feeds "
                                f"{users[0].name} in the forward")
    return n, additive, None


class _TargetWeight(torch.nn.Module):
    """Sum of the class weights of the non-ignored targets of an nll_loss, from the inputs alone."""

    def __init__(self, gm: torch.fx.GraphModule, ignore_index: int):
        super().__init__()
        self.gm, self.ignore_index = gm, ignore_index

    def forward(self, mb_inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        target, weight = self.gm(*mb_inputs)
        keep = target != self.ignore_index
        if weight is None:
            return keep.sum().to(torch.float64)
        w = weight[torch.where(keep, target, 0)]
        return (w * keep).sum().to(torch.float64)


class _SizeWeight:
    """Weight proportional to the microbatch's size (elements reduced by a mean; 1 for a sum)."""

    def __init__(self, per_sample: float, position: int, dim: int):
        self.per_sample, self.position, self.dim = per_sample, position, dim

    def __call__(self, mb_inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.per_sample is None:
            return torch.tensor(1.0, dtype=torch.float64)
        n = mb_inputs[self.position].shape[self.dim]
        return torch.tensor(self.per_sample * n, dtype=torch.float64)


def _target_weight(step, prop, nll: torch.fx.Node) -> tuple[Callable | None, str | None]:
    """The nll's total weight as a function of the step's inputs: its target's and weight's
    ancestors copied into a graph of their own, the batch entry of their shape arguments made -1
    (the capture recorded the whole batch's sizes), checked on a fake one-sample microbatch."""
    kw = op_kwargs(nll)
    roots = [kw["target"]] + ([kw["weight"]] if isinstance(kw["weight"], torch.fx.Node) else [])
    needed, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack += n.all_input_nodes
    bad = [n for n in needed if n.op == "placeholder" and step.roles[n.name] is not Role.INPUT]
    if bad:
        return None, (f"the loss's targets or class weights depend on "
                      f"{step.roles[bad[0].name].value} {bad[0].name}: the weight of a microbatch "
                      "cannot be computed from its inputs")
    graph, env, root = torch.fx.Graph(), {}, torch.nn.Module()
    for n in step.gm.graph.nodes:
        if n.op == "placeholder" and step.roles[n.name] is Role.INPUT:
            env[n] = graph.placeholder(n.name)
        elif n in needed:
            if n.op == "get_attr":
                setattr(root, n.target, getattr(step.gm, n.target))
            env[n] = graph.node_copy(n, lambda a: env[a])
            st = prop.state(n)
            if op_name(n) in ("view", "_unsafe_view", "reshape", "expand") and st \
                    and st.dim is not None:
                sizes = list(n.meta["val"].shape)
                sizes[st.dim] = -1
                env[n].args = (env[n].args[0], sizes, *env[n].args[2:])
    graph.output((env[kw["target"]], env[kw["weight"]] if len(roots) > 1 else None))
    fn = _TargetWeight(torch.fx.GraphModule(root, graph), int(kw["ignore_index"]))
    inputs = [n for n in step.gm.graph.nodes
              if n.op == "placeholder" and n.name in step.input_names]
    try:
        with torch_compat.FAKE_TENSOR_MODE()(allow_non_fake_inputs=True):
            fakes = [torch.empty([1 if d == prop.state(n).dim else s for d, s in
                                  enumerate(n.meta["val"].shape)], dtype=n.meta["val"].dtype,
                                 device=n.meta["val"].device) for n in inputs]
            target = fn.gm(*fakes)[0]
        ok = target.shape[0] * prop.B == kw["target"].meta["val"].shape[0]
    except Exception as exc:  # the graph does not follow the batch
        log.debug("the target weight graph fails on one sample: %s", exc)
        ok = False
    if not ok:
        return None, ("the loss's targets are computed from the inputs with shapes fixed to the "
                      "whole batch: the weight of a microbatch cannot be computed")
    return fn, None


def _input_dims(step, batch_dims) -> tuple[int, dict[str, int | None]]:
    shapes = {p: tuple(n.meta["val"].shape) for n in step.gm.graph.nodes
              if n.op == "placeholder" and (p := step.input_names.get(n.name)) is not None}
    if not shapes:
        raise StepInputError("the step has no tensor input: there is no batch to split")
    overrides = dict(batch_dims or {})
    unknown = sorted(set(overrides) - set(shapes))
    if unknown:
        raise StepInputError(f"batch_dims names unknown inputs {unknown}; the step's inputs are "
                             f"{list(shapes)}")
    dims = {}
    for path, d in overrides.items():
        if d is not None:
            n = len(shapes[path])
            if not isinstance(d, int) or not -n <= d < n:
                raise StepInputError(f"batch_dims[{path!r}] = {d!r} is out of range for an input "
                                     f"of shape {shapes[path]}")
            d %= n
        dims[path] = d
    sized = [(p, shapes[p][d]) for p, d in dims.items() if d is not None]
    if sized:
        batch = sized[0][1]
    else:
        first = next(iter(shapes.values()))
        if not first:
            raise StepInputError(f"the first input {next(iter(shapes))} is a scalar: pass "
                                 "batch_dims to say which input dims carry the batch")
        batch = first[0]
    for p, shp in shapes.items():
        dims.setdefault(p, 0 if shp and shp[0] == batch else None)
    sizes = {p: shapes[p][d] for p, d in dims.items() if d is not None}
    if len(set(sizes.values())) > 1:
        raise StepInputError(f"the batched inputs disagree on the batch size: {sizes}; pass "
                             "batch_dims={path: dim or None} to say which dims carry the batch")
    if not sizes:
        raise StepInputError("no input carries the batch (batch_dims marks none)")
    return batch, dims


def _weights(step, prop, r, batch, dims, paths, additive):
    """The loss's reduction over the batch, its microbatch weight function, and why not."""
    name, kw = op_name(r), op_kwargs(r)
    mode = {0: None, 1: "mean", 2: "sum"}.get(kw.get("reduction"), name)
    if name in NLL_OPS and mode == "mean":
        weight_fn, reason = _target_weight(step, prop, r)
        return "mean_over_targets", weight_fn, reason
    if mode not in ("mean", "sum") or (name not in NLL_OPS | LOSS_OPS | {"mean", "sum"}):
        return None, None, (f"the loss reduces the batch with {r.target}: microbatches cannot "
                            "reproduce it exactly (only means, sums and cross-entropy can be "
                            "split)")
    if mode == "sum" and additive:
        return None, None, ("the loss adds a batch-independent term to a sum over the batch: "
                            "each microbatch would add it again")
    per = None
    if mode == "mean":  # elements averaged, per sample
        shape = r.args[0].meta["val"].shape
        reduced = range(len(shape)) if kw.get("dim") in (None, []) else kw["dim"]
        per = math.prod(shape[d % len(shape)] for d in reduced) / batch
    first = next(i for i, p in enumerate(paths) if dims[p] is not None)
    return mode, _SizeWeight(per, first, dims[paths[first]]), None


def _random_draws(step, prop, exact_random: bool) -> tuple[Draw | None, ...]:
    """The forward's random ops as whole-batch draws (None: not drawn so), in order; a random op
    that is not one is a coupling of kind "random" (all of them without ``exact_random``)."""
    draws = []
    for n in step.gm.graph.nodes:
        if not is_random(n) or n.name in step.backward_nodes:
            continue
        found = whole_draw(n, prop) if exact_random else (
            "the microbatches' graphs draw with the compiler's own generator (exact_random=False)")
        draws.append(found if isinstance(found, Draw) else None)
        if not isinstance(found, Draw):
            prop.problems.setdefault(n, Problem(
                "random", f"draws random numbers: each microbatch would draw its own, of the same "
                f"distribution but not the whole batch's values under the same seed ({found})"))
    return tuple(draws) if any(draws) else ()


def analyze_batch(step: CapturedStep, batch_dims: Mapping[str, int | None] | None = None, *,
                  exact_random: bool = True) -> BatchAnalysis:
    """Find the batch dim of every input and value, the ops that mix samples and the loss's
    reduction over the batch. ``batch_dims`` ({input path: dim or None}) overrides the default:
    the batch size is dim 0 of the first input, and every input whose dim 0 has that size is
    batched along dim 0. Raises :class:`StepInputError` for an override that names an unknown
    input, a dim out of range, or batched inputs of different sizes.

    Random ops (dropout) whose whole-batch values the microbatches can read
    (:mod:`fxmem.levers.microbatch.draws`) are listed in ``draws``, not as couplings; with
    ``exact_random=False`` (the compiled graphs draw with Inductor's own generator) every
    random op is a coupling of kind "random"."""
    batch, dims = _input_dims(step, batch_dims)
    paths = tuple(step.input_names.values())
    node_of = {p: n for n, p in step.input_names.items()}
    prop = Propagation(step, batch, {node_of[p]: d for p, d in dims.items()})
    reduction, weight_fn = None, None
    r, additive, reason = _loss_chain(step, prop)
    if r is not None:
        reduction, weight_fn, reason = _weights(step, prop, r, batch, dims, paths, additive)
        if reason is None:
            del prop.problems[r]  # the loss's own reduction: what the weights reproduce
        else:
            reduction, weight_fn = None, None
    nodes = {n.name: n for n in step.gm.graph.nodes}
    held = []
    for h in step.held_outputs:
        s = prop.state(nodes[h])
        held.append(None if s is None else s.dim)
        if s is not None and s.outer != 1:
            held[-1] = None
            prop.problems.setdefault(nodes[h], Problem(
                "batch_mixing", f"the held output interleaves samples along dim {s.dim}: "
                "microbatches' outputs cannot be concatenated"))
    draws = _random_draws(step, prop, exact_random)
    coupling = tuple(Coupling(n.name, p.kind, str(getattr(n.target, "overloadpacket", n.target)),
                              _source(n), p.detail, p.momentum) for n, p in prop.problems.items())
    if reason is None and coupling:
        reason = "forward ops mix samples across the batch: " + "; ".join(map(str, coupling))
    analysis = BatchAnalysis(batch, MappingProxyType({p: dims[p] for p in paths}), paths,
                             reduction, coupling, tuple(held), weight_fn, reason,
                             tuple(prop.mutated), draws)
    log.debug("batch analysis: batch %d, dims %s, reduction %s, %d couplings", batch, dims,
              reduction, len(coupling))
    return analysis
