"""FSDP2 (``fully_shard``) with fxmem: each rank's step under the rank's budget.

    dist.init_process_group("gloo")                  # or "nccl", launched by torchrun
    opt = torch.optim.AdamW(model.parameters())      # before optimize_fsdp: it moves it
    model = optimize_fsdp(model, budget="2GiB", units=model.blocks, optimizer=opt)
    loss = model(x, y); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    print(model.fxmem_fsdp.report())

``optimize_fsdp`` applies ``fully_shard`` itself, to each unit (a transformer block) and then to
the root, and compiles each unit with an fxmem backend (through Inductor by default, or as FX
code with ``lowering="eager"``; the unit graph's plan models the lowering it runs): in torch
2.13 FSDP2's hooks run outside TorchDynamo, so the step is a graph per unit (its forward and
backward planned by fxmem), with FSDP2's all-gathers, reshards and reduce-scatters between them
and the root's own code (the embeddings, the head, the loss) run eagerly. Identical units
compile to one graph and share one plan. The plan is made on the first call of each input
signature: the root's step is captured with every unit replaced by a stub and simulated as eager
PyTorch runs it, and the unit graph's budget is searched so that the whole rank's step -- root,
every unit, what FSDP2 holds (:mod:`fxmem.distributed.fsdp_memory`) and, with ``optimizer=``,
the optimizer's state over the rank's shards and its ``step()`` -- fits the budget.

The optimizer is built on ``model.parameters()`` before ``optimize_fsdp``, which moves it onto
the FSDP2 shards (:mod:`fxmem.distributed.fsdp_optimizer`). Refused, with a message: a model
that is already sharded or wrapped in DDP, units of different shapes, an optimizer that has
stepped or holds tensors other than the model's parameters, the microbatch and other levers,
and a step that starts with gradients (gradient accumulation across steps).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging

import torch

from fxmem.budget import BudgetError, format_bytes, parse_budget
from fxmem.distributed.fsdp_memory import (RankOptimizer, RootStep, Stitched, UnitStub,
                                           capture_root, stitch, unit_sizes)
from fxmem.distributed.fsdp_optimizer import check_optimizer, move_onto_shards, rank_optimizer
from fxmem.distributed.ddp import require_process_group
from fxmem.errors import StepInputError
from fxmem.graph import torch_compat
from fxmem.planning.options import PlanOptions, StepContext, default_margin

__all__ = ["optimize_fsdp", "FsdpStep", "measure_fsdp_step"]

log = logging.getLogger(__name__)

_OPTIONS = {"allow", "strategy", "lowering", "time_limit", "safety_margin", "cost",
            "exact_random"}
_SEARCH_STEPS = 5


def measure_fsdp_step(step, model: torch.nn.Module, inputs=(), optimizer=None):
    """:func:`fxmem.measure_memory` of ``step`` on this rank, with the model's parameter shards,
    ``inputs`` and the ``optimizer``'s state (if any yet) live at its start."""
    import fxmem
    from fxmem.memory.measure import live_tensor_bytes

    roots = [model, list(inputs)] + ([optimizer] if optimizer is not None else [])
    start = live_tensor_bytes("cpu", roots=roots)
    return fxmem.measure_memory(step, device="cpu", baseline=start)


@dataclasses.dataclass
class _Made:
    plan: object
    stitched: Stitched


class FsdpStep:
    """fxmem's state for one FSDP2 model: the budget, the root's captured step per input
    signature, and the plans of the unit graphs. ``model.fxmem_fsdp`` holds it."""

    def __init__(self, stubbed: torch.nn.Module, units: list[torch.nn.Module], budget: int,
                 options: PlanOptions, exact_random: bool, loss_fn=None,
                 optimizer: RankOptimizer | None = None):
        self.stubbed, self.units, self.budget = stubbed, units, budget
        self.options, self.exact_random, self.loss_fn = options, exact_random, loss_fn
        self.optimizer = optimizer
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.sizes = unit_sizes(list(self._full_params(units[0])), self.world)
        self.roots: dict[tuple, RootStep] = {}
        self.root: RootStep | None = None
        self.resident = 0
        self.made: list[_Made] = []

    @staticmethod
    def _full_params(unit):
        from torch.distributed.tensor import DTensor

        for p in unit.parameters():
            yield torch.empty(p.shape, dtype=p.dtype, device="meta") if isinstance(p, DTensor) \
                else p

    # -- the root's step, before each call -------------------------------------------------
    def before_call(self, module, args, kwargs):
        from fxmem.memory.measure import live_tensor_bytes

        if any(p.grad is not None for p in module.parameters()):
            raise StepInputError(
                "fxmem plans FSDP2 steps that start without gradients: call "
                "model.zero_grad(set_to_none=True) after each step (gradient accumulation "
                "across steps is not supported yet)")
        key = tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t)
                    for t in (*args, *kwargs.values()))
        if key not in self.roots:
            self.roots[key] = capture_root(self.stubbed, args, kwargs, self.loss_fn)
            log.info("rank %d: captured the root's step for %s", self.rank, key)
        self.root = self.roots[key]
        self.resident = live_tensor_bytes("cpu", roots=[module])

    # -- a unit graph, compiled by TorchDynamo -----------------------------------------------
    def backend(self, gm, example_inputs):
        from fxmem.api.backend import (_boxed, _compile_keeping_recomputed_in_place,
                                       SplitDelayedAddmm)

        if self.root is None:
            raise RuntimeError("an FSDP unit was compiled outside its model's step: call the "
                               "model optimize_fsdp returned, not a unit on its own")
        partitioner = _UnitPartitioner(self)
        if self.options.lowering == "eager":
            return torch_compat.AOT_AUTOGRAD()(fw_compiler=_boxed, bw_compiler=_boxed,
                                              partition_fn=partitioner)(gm, example_inputs)
        patches = {"custom_partitioner_fn": partitioner, "fallback_random": self.exact_random,
                   "post_grad_custom_post_pass": SplitDelayedAddmm()}
        with torch_compat.FUNCTORCH_CONFIG().patch(enable_autograd_cache=False):
            return torch_compat.COMPILE_FX()(gm, example_inputs, config_patches=patches,
                                             inner_compile=_compile_keeping_recomputed_in_place)

    def plan_unit(self, plan_at) -> _Made:
        """The unit plan whose stitched step fits the budget with the least recomputation:
        ``plan_at(budget)`` plans the unit graph alone; its budget is searched.

        A known limit: the unit budget bounds the unit graph's own peak, not the bytes it saves
        for its backward, which the step's peak counts once per unit. Where plans that save
        more leave the unit's peak unchanged, no unit budget reaches the plans in between and
        the search keeps the smaller (the bench GPT through Inductor: 10.8 MB or 17.3 MB saved
        per unit at one unit peak of 30.7 MB; at a budget between their steps, 84.4 and 113.8
        MB, the first)."""
        root, n = self.root, len(self.units)
        margin = self.options.safety_margin
        if margin is None:
            margin = default_margin(self.options.lowering, "cpu")
        target = int(self.budget * (1 - margin))

        def made(plan):
            m = _Made(plan, stitch(root, plan.timeline, self.sizes, units=n,
                                   resident=self.resident, optimizer=self.optimizer))
            log.debug("rank %d: unit budget %d: unit peak %d, saved %d per unit, %d "
                      "recomputed; the step's peak %d at %s, bound %d (target %d)", self.rank,
                      plan.options.budget, plan.predicted_peak, m.stitched.saved_per_unit,
                      plan.solution.num_recomputed, m.stitched.peak, m.stitched.at,
                      m.stitched.bound, target)
            return m

        top = made(plan_at(1 << 50))
        if top.stitched.bound <= target:
            return self._keep(top)
        try:
            plan_at(1)
        except BudgetError as exc:
            low_budget = exc.floor
        bottom = made(plan_at(low_budget))
        if bottom.stitched.bound > target:
            raise BudgetError(
                f"rank {self.rank}: no plan of the FSDP2 step fits "
                f"{format_bytes(self.budget)}: the smallest is {format_bytes(bottom.stitched.peak)}"
                f" at {bottom.stitched.at} ({_held(bottom.stitched.breakdown)})",
                floor=int(bottom.stitched.bound / (1 - margin)) + 1,
                holders=bottom.stitched.breakdown, unoptimized=top.stitched.peak)
        lo, hi, best = low_budget, top.plan.predicted_peak, bottom
        for _ in range(_SEARCH_STEPS):
            mid = (lo + hi) // 2
            candidate = made(plan_at(mid))
            if candidate.stitched.bound <= target:
                lo, best = mid, candidate
            else:
                hi = mid
        return self._keep(best)

    def check_planned(self) -> None:
        """After the model's first forward: its units' graph was planned, not run by TorchDynamo
        without fxmem's backend (a silent overshoot of the budget)."""
        if not self.made:
            raise RuntimeError(
                "fxmem made no plan for the FSDP2 units: TorchDynamo ran their forward without "
                "compiling it with fxmem's backend. It stops compiling a function after "
                "torch._dynamo.config.recompile_limit compilations (8 by default), and each "
                "model optimize_fsdp returns compiles the units' forward anew: call "
                "torch._dynamo.reset() before optimize_fsdp when an earlier model is gone, or "
                "raise the limit")

    def _keep(self, m: _Made) -> _Made:
        self.made.append(m)
        log.info("rank %d: FSDP2 step planned: %s at %s", self.rank,
                 format_bytes(m.stitched.peak), m.stitched.at)
        return m

    # -- what the user reads -----------------------------------------------------------------
    @property
    def plan(self):
        """The latest unit graph's plan (:class:`fxmem.planning.planner.Plan`)."""
        if not self.made:
            raise RuntimeError("no plan yet: call the model on a batch first")
        return self.made[-1].plan

    @property
    def predicted_peak(self) -> int:
        return self.made[-1].stitched.peak if self.made else 0

    def report(self) -> str:
        if not self.made:
            return "no plan yet: call the model on a batch first"
        m = self.made[-1]
        s = m.stitched
        lines = [
            f"rank {self.rank} of {self.world} (FSDP2, fully_shard on {len(self.units)} units and "
            f"the root): budget {format_bytes(self.budget)}, predicted peak "
            f"{format_bytes(s.peak)} at {s.at} ({format_bytes(s.bound)} if a prefetch's copy on "
            f"gloo's thread is still in flight at the peak: the bound kept under the budget)",
            f"the sharding holds: parameter shards {format_bytes(self.resident)} resident "
            f"(1/{self.world} of each parameter, padded); per unit an all-gather of "
            f"{format_bytes(self.sizes.gathered)} (its parameters while it runs, the next "
            f"unit's prefetched in the backward), a reduce-scatter input of the same size and a "
            f"gradient shard of {format_bytes(self.sizes.shard)}; the root's own parameters "
            f"all-gathered for the whole step",
            *_optimizer_lines(self.optimizer, self.world),
            f"each unit saves {format_bytes(s.saved_per_unit)} for its backward (its input "
            f"included); one graph, planned for all {len(self.units)} units:",
            f"at the peak: {_held(s.breakdown)}",
            "unit graph plan:", m.plan.report()]
        return "\n".join(lines)


def _optimizer_lines(opt: RankOptimizer | None, world: int) -> list[str]:
    if opt is None:
        return ["no optimizer counted (pass optimizer= to optimize_fsdp to count its state and "
                "step)"]
    return [f"the optimizer, {opt.name}, holds {format_bytes(opt.state)} of state over this "
            f"rank's shards (1/{world} of each parameter's; held from the first step() on, "
            f"which allocates it) and its step() {format_bytes(opt.step)} of temporaries, "
            f"beside the gradient shards it reads ({format_bytes(opt.gradients)})"]


def _held(breakdown) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in breakdown.items())


class _UnitPartitioner(torch_compat.CUSTOM_PARTITIONER_FN()):
    """AOTAutograd's partition function (or Inductor's custom partitioner) for a unit graph."""

    def __init__(self, step: FsdpStep):
        self.step = step

    # Inductor (torch 2.13) deep-copies its config, custom_partitioner_fn included, and pickles
    # the copy into the FX graph cache's key. The step holds the FSDP2 units: FSDP2 refuses
    # deepcopy ("FSDP does not support deepcopy": the compile failed) and their classes
    # (FSDPBlock, made by fully_shard) cannot be pickled (the cache was bypassed). The
    # partitioner is a handle on the step: its copy is itself, and it pickles as its uuid.
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return str, (self.uuid(),)

    def __call__(self, joint, joint_inputs, **kwargs):
        from fxmem.planning.planner import plan_joint

        static = set(kwargs.get("static_lifetime_input_indices") or ())
        options = dataclasses.replace(self.step.options, safety_margin=0.0)

        def plan_at(budget):
            return plan_joint(joint, num_fwd_outputs=kwargs["num_fwd_outputs"],
                              static_input_indices=static,
                              options=dataclasses.replace(options, budget=int(budget)),
                              context=StepContext())  # leaves ``joint`` as it was

        made = self.step.plan_unit(plan_at)
        made.plan.notes = (*made.plan.notes, f"an FSDP2 unit graph on rank {self.step.rank}: "
                           f"planned so that the whole step fits {self.step.budget} bytes")
        return made.plan.graphs["forward"], made.plan.graphs["backward"]

    def uuid(self):
        from fxmem.api.backend import _source_hash

        s = self.step
        key = repr((dataclasses.asdict(s.options), s.budget, s.resident, s.world, s.optimizer,
                    s.root.timeline.labels if s.root else None))
        return hashlib.sha256((_source_hash() + key).encode()).hexdigest()


def _default_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for child in model.modules() if isinstance(child, torch.nn.ModuleList)
            for m in child]


def _stub_copy(model: torch.nn.Module, units: list[torch.nn.Module]) -> torch.nn.Module:
    """A copy of ``model`` (its own parameters only) whose units are :class:`UnitStub`."""
    names = {id(m): n for n, m in model.named_modules()}
    swaps = []
    for unit in units:
        name = names[id(unit)]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        swaps.append((parent, attr, unit))
        parent._modules[attr] = UnitStub(name)
    try:
        return copy.deepcopy(model)
    finally:
        for parent, attr, unit in swaps:
            parent._modules[attr] = unit


def optimize_fsdp(model: torch.nn.Module, budget: int | str, *, units=None, mesh=None,
                  loss_fn=None, optimizer=None, **options) -> torch.nn.Module:
    """``fully_shard`` each of ``units`` (default: the members of the model's ``ModuleList``s)
    and then ``model``, compile each unit with fxmem, and plan every rank's step under
    ``budget`` (each rank's). Returns ``model`` (now an FSDP2 module); ``model.fxmem_fsdp`` is
    its :class:`FsdpStep` (``.report()``, ``.predicted_peak``, ``.plan``). ``optimizer``: a
    ``torch.optim`` SGD, Adam or AdamW built on ``model.parameters()`` before this call and not
    stepped yet; it is moved onto the FSDP2 shards, and its state on the rank's shards and its
    ``step()`` count in the budget (an optimizer built afterwards is not counted).
    ``options``: ``allow`` (``("recompute",)`` only), ``strategy``, ``lowering``
    (``"inductor"``, the default, or ``"eager"``: the unit graphs run as FX code),
    ``time_limit``, ``safety_margin``, ``cost``, ``exact_random``."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    require_process_group("optimize_fsdp")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise StepInputError("optimize_fsdp shards the model itself: pass the model, not "
                             "DistributedDataParallel(model)")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise StepInputError("pass the model before fully_shard: optimize_fsdp applies "
                             "fully_shard to each unit and the root itself")
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    allow = tuple(options.get("allow", ("recompute",)))
    if set(allow) != {"recompute"}:
        raise ValueError(f"optimize_fsdp plans recomputation only, got allow={allow}: "
                         "microbatching runs the whole step per microbatch, which FSDP2's hooks "
                         "would all-gather and reduce-scatter each time")
    if "cuda" in {p.device.type for p in model.parameters()}:
        raise NotImplementedError("optimize_fsdp is built and measured on CPU ranks (gloo)")
    units = list(units) if units is not None else _default_units(model)
    if not units:
        raise StepInputError("no units to shard: pass units=[...] (the transformer blocks)")
    shapes = {tuple((n, tuple(p.shape)) for n, p in u.named_parameters()) for u in units}
    if len(shapes) != 1:
        raise NotImplementedError("fxmem plans FSDP2 units of one structure (their graphs "
                                  "share one plan); these units' parameters differ")
    plan_options = PlanOptions(  # checks the options before the model is sharded
        budget=parse_budget(budget), allow=frozenset(allow),
        strategy=options.get("strategy", "ilp"),
        time_limit=float(options.get("time_limit", 30.0)),
        safety_margin=options.get("safety_margin"), cost=options.get("cost", "roofline"),
        lowering=options.get("lowering", "inductor"))
    names = check_optimizer(optimizer, model) if optimizer is not None else None
    stubbed = _stub_copy(model, units)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    rank_opt = None
    if optimizer is not None:
        move_onto_shards(optimizer, model, names)
        rank_opt = rank_optimizer(optimizer, model, units, torch.distributed.get_world_size())
    step = FsdpStep(stubbed, units, parse_budget(budget), plan_options,
                    bool(options.get("exact_random", True)), loss_fn, rank_opt)
    model.register_forward_pre_hook(step.before_call, prepend=True, with_kwargs=True)
    forward = model.forward

    @functools.wraps(forward)
    def forward_raising_budget_errors(*args, **kwargs):
        try:
            out = forward(*args, **kwargs)
        except Exception as exc:  # TorchDynamo wraps what a backend raises
            inner = getattr(exc, "inner_exception", None)
            if isinstance(inner, BudgetError):
                raise inner from None
            raise
        step.check_planned()
        return out

    model.forward = forward_raising_budget_errors
    for unit in units:
        unit.compile(backend=step.backend)
    model.fxmem_fsdp = step
    return model
