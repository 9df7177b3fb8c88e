"""The ``fxmem`` torch.compile backend: TorchDynamo captures, AOTAutograd builds the joint graph,
fxmem's planner partitions it under the budget, and the forward and backward graphs are lowered
through TorchInductor (or run as FX code with ``lowering="eager"``).

    compiled = torch.compile(model, backend="fxmem", options={"budget": "2GiB"})

``options``: ``budget`` (bytes or a string with a unit; without it, the environment variable
``FXMEM_BUDGET``, e.g. ``FXMEM_BUDGET=2GiB``, for code that calls ``torch.compile`` itself),
``allow``, ``strategy``, ``lowering`` ("inductor" or "eager"), ``time_limit``,
``safety_margin``, ``optimizer`` (a ``torch.optim.Optimizer`` whose state and step count against
the budget), ``exact_random`` (default True: Inductor draws random numbers with PyTorch's own
generator, so dropout matches eager PyTorch exactly).

With Inductor the partitioner is installed as ``torch._inductor.config.custom_partitioner_fn``;
its ``uuid`` hashes fxmem's sources and the options (the budget included), so Inductor's cache
never reuses a plan made for another budget or another version of fxmem. The backend is
registered through the ``torch_dynamo_backends`` entry point.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx

from fxmem.budget import BudgetError, parse_budget
from fxmem.graph import torch_compat
from fxmem.passes.base import StepGraphs
from fxmem.passes.inductor_order import SplitDelayedAddmm, keep_recomputed_in_place
from fxmem.passes.microbatch_draws import DrawDecision, MicrobatchDraws
from fxmem.api.graph_breaks import compiled_inside_eager_code, session_for, warn_unguaranteed
from fxmem.levers.precision.backend_casts import (autocast_graph, backend_precision,
                                                  tracing_with_casts)
from fxmem.levers.precision.casts import ComputeCasts, casts_for
from fxmem.levers.precision.fallback import check_stored_bits, combined_error
from fxmem.levers.precision.lever import PrecisionLever
from fxmem.planning.options import PlanOptions, StepContext, check_allow
from fxmem.planning.planner import Plan, optimizer_bytes, plan_joint

__all__ = ["fxmem_backend", "FxmemPartitioner", "make_backend", "PlanLog", "PlanReady"]

log = logging.getLogger(__name__)

BUDGET_ENV = "FXMEM_BUDGET"  # the budget of a torch.compile call given no options
_OPTION_KEYS = {"budget", "allow", "strategy", "lowering", "time_limit", "safety_margin",
                "optimizer", "exact_random", "cost", "precision", "stored_bits"}


class PlanLog:
    """Where a backend leaves the plans it makes, newest last (one per compiled graph); it keeps
    the last ``keep`` of them (a plan holds its graphs)."""

    def __init__(self, keep: int = 16):
        self.plans: collections.deque[Plan] = collections.deque(maxlen=keep)

    @property
    def latest(self) -> Plan:
        if not self.plans:
            raise RuntimeError("no plan yet: the graph is planned on its first call")
        return self.plans[-1]


@functools.cache
def _source_hash() -> str:
    """fxmem's sources, hashed once per process (Inductor asks for the uuid on every compile)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


class FxmemPartitioner(torch_compat.CUSTOM_PARTITIONER_FN()):
    """A partition function (AOTAutograd's, or Inductor's custom_partitioner_fn) that plans."""

    def __init__(self, options: PlanOptions, plans: PlanLog, n_static: int | None = None, *,
                 context: StepContext = StepContext(), stop_after_plan: bool = False,
                 session=None, note: str | None = None, hint: str | None = None,
                 annotate: Callable[[Plan], None] | None = None,
                 draws: DrawDecision | None = None):
        self.options, self.plans, self.n_static, self.context = options, plans, n_static, context
        self.stop_after_plan, self.session, self.note = stop_after_plan, session, note
        self.hint = hint  # added to a BudgetError's message (what else was tried)
        self.annotate = annotate  # what a lever applied at capture adds to the plan (precision)
        self.draws = draws  # a microbatch's random ops read the whole batch's draws

    def __call__(self, joint, joint_inputs, **kwargs):
        static = set(kwargs.get("static_lifetime_input_indices") or ())
        if self.n_static is not None:
            static |= set(range(self.n_static))
        drawn = None
        if self.draws is not None:  # before planning: a read is exact and cheap to recompute
            _, drawn = MicrobatchDraws()(StepGraphs(kwargs["num_fwd_outputs"], joint=joint),
                                         self.draws)
        try:
            plan = plan_joint(joint, num_fwd_outputs=kwargs["num_fwd_outputs"],
                              static_input_indices=static, options=self.options,
                              context=self.context)
        except BudgetError as exc:
            if not self.hint:
                raise
            raise exc.with_hint(self.hint) from None
        if drawn is not None:
            plan.provenance = (drawn, *plan.provenance)
        if self.note:
            plan.notes = (*plan.notes, self.note)
        if self.annotate is not None:
            self.annotate(plan)
        if self.session is not None:
            self.session.add(plan)
        self.plans.plans.append(plan)
        log.info("fxmem plan: %s", plan.record.summary())
        if self.stop_after_plan:
            raise PlanReady(plan)
        return plan.graphs["forward"], plan.graphs["backward"]

    def uuid(self) -> Any:
        opts = dataclasses.asdict(self.options)
        key = (repr(sorted((k, repr(v)) for k, v in opts.items())) + repr(self.n_static)
               + self.context.key() + repr(self.draws))
        return hashlib.sha256((_source_hash() + key).encode()).hexdigest()


def _boxed(gm: torch.fx.GraphModule, _example_inputs):
    """Run a graph as FX code with the boxed calling convention (inputs freed after last use)."""
    gm.graph.set_codegen(torch_compat.BOXED_CODEGEN()())
    gm.recompile()
    return gm


def _compile_keeping_recomputed_in_place(*args, **kwargs):
    """Inductor's ``compile_fx_inner`` (per graph; the backward's runs later, on its first call)
    with fusion heuristics that leave recomputed ops where the plan put them, and with the
    graph's custom ops' fallbacks registered first (``torch_compat.register_custom_fallbacks``):
    Inductor then lowers the graph the same whatever the process compiled before, as fxmem's
    memory model of it assumes."""
    compile_fx_inner = torch_compat.COMPILE_FX_INNER()
    gm = kwargs["gm"] if "gm" in kwargs else args[0]
    torch_compat.register_custom_fallbacks(gm)
    with keep_recomputed_in_place():
        return compile_fx_inner(*args, **kwargs)


class PlanReady(Exception):
    """Raised by a partitioner made with ``stop_after_plan``: the plan is made, and the compile
    stops before any kernel is generated (``OptimizedModule.plan_for``)."""

    def __init__(self, plan: Plan):
        super().__init__("planned")
        self.plan = plan


def make_backend(options: PlanOptions, plans: PlanLog, *, context: StepContext = StepContext(),
                 exact_random: bool = True, stop_after_plan: bool = False,
                 hint: str | None = None, annotate: Callable[[Plan], None] | None = None,
                 draws: DrawDecision | None = None, casts: ComputeCasts | None = None,
                 forced: bool = False):
    """A TorchDynamo backend that plans every graph it is given with ``options`` (whose
    ``lowering`` says how the graphs run: the memory model follows it) and ``context``;
    ``stop_after_plan``: raise :class:`PlanReady` with the plan instead of compiling it;
    ``hint``: added to a BudgetError's message; ``annotate(plan)``: what a lever applied when the
    step was captured adds to each plan (the precision lever's record); ``draws``: the graph is
    a microbatch's, whose random ops read the whole batch's draws (the microbatch-draws pass
    rewrites its joint graph before it is planned). ``casts``: the precision lever -- a graph
    the exact levers cannot fit under the budget is planned again run under autocast with
    them (:mod:`fxmem.levers.precision.backend_casts`); ``forced``: every graph is."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        session, last = session_for(gm)
        held, note = context, None
        if session is None and (where := compiled_inside_eager_code()) is not None:
            note = warn_unguaranteed(where)
        if session is not None:  # one of several graphs of a step: the others' bytes count
            device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)),
                          torch.device("cpu"))
            others, note = session.context_for(example_inputs, options.limit_for(device),
                                               more=not last)
            held = dataclasses.replace(
                context, resident=context.resident + others.resident,
                during_backward=context.during_backward + others.during_backward)
        low = autocast_graph(gm, casts) if casts is not None else None

        def compile_graph(graph, plan_options, annotate_plan, cast):
            partitioner = FxmemPartitioner(plan_options, plans, context=held,
                                           stop_after_plan=stop_after_plan, session=session,
                                           note=note, hint=hint, annotate=annotate_plan,
                                           draws=draws)
            with tracing_with_casts(cast):
                return _lower(graph, example_inputs, partitioner, plan_options, exact_random)

        if low is None:
            return compile_graph(gm, options, annotate, None)
        low_options = dataclasses.replace(options, store_low=torch.bfloat16)
        lever = PrecisionLever(casts).annotate
        if forced:
            return compile_graph(low, low_options, lever, casts)
        try:
            return compile_graph(gm, options, annotate, None)
        except BudgetError as exact:
            log.info("fxmem backend: the exact levers do not fit this graph (%s); planning it "
                     "with %s compute casts", str(exact).splitlines()[0], casts.dtype_name)
            try:
                return compile_graph(low, low_options, lever, casts)
            except BudgetError as low_error:
                raise combined_error(exact, low_error, casts) from None

    return backend


def _lower(gm: torch.fx.GraphModule, example_inputs, partitioner: FxmemPartitioner,
           options: PlanOptions, exact_random: bool):
    """Compile ``gm`` with ``partitioner`` planning its joint graph, lowered as ``options``
    says (FX code or Inductor)."""
    if options.lowering == "eager":
        aot_autograd = torch_compat.AOT_AUTOGRAD()
        return aot_autograd(fw_compiler=_boxed, bw_compiler=_boxed,
                            partition_fn=partitioner)(gm, example_inputs)
    compile_fx = torch_compat.COMPILE_FX()
    patches = {"custom_partitioner_fn": partitioner, "fallback_random": exact_random,
               "post_grad_custom_post_pass": SplitDelayedAddmm()}
    # AOTAutograd's cache would skip the partitioner, so the plan (model.plan, the report)
    # would be missing; Inductor's FX graph cache still serves the kernels
    with torch_compat.FUNCTORCH_CONFIG().patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, config_patches=patches,
                          inner_compile=_compile_keeping_recomputed_in_place)


def _resolve_budget(options: Mapping[str, Any]) -> int:
    """The budget in bytes: ``options["budget"]``, else the environment variable
    ``FXMEM_BUDGET`` (for code that calls ``torch.compile(model, backend="fxmem")`` itself),
    read here once per compile so the planner never looks at the environment."""
    if "budget" in options:
        return parse_budget(options["budget"])
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        raise ValueError('the fxmem backend needs a budget: options={"budget": "2GiB"}, or the '
                         f'environment variable {BUDGET_ENV} (e.g. {BUDGET_ENV}=2GiB) for code '
                         'that calls torch.compile(model, backend="fxmem") without options')
    try:
        budget = parse_budget(int(raw) if raw.isdigit() else raw)
    except BudgetError as exc:
        relative = (" A percentage is of a step's unoptimised peak, which only the command line"
                    " (fxmem plan --budget 60%) measures first." if raw.endswith("%") else "")
        raise BudgetError(f"environment variable {BUDGET_ENV}={raw!r} is not a budget: {exc} "
                          f"(bytes, or a number with a unit: 512MiB, 2GB, 1.5GiB).{relative}"
                          ) from None
    log.info("fxmem backend: budget %d bytes from %s=%r", budget, BUDGET_ENV, raw)
    return budget


def options_from_mapping(options: Mapping[str, Any] | None
                         ) -> tuple[PlanOptions, StepContext, bool]:
    """PlanOptions, the optimizer's StepContext and exact_random from torch.compile's
    ``options`` dict. Without a ``budget`` option the budget is the environment variable
    ``FXMEM_BUDGET`` (e.g. ``2GiB``); with neither, a ValueError says so."""
    options = dict(options or {})
    unknown = set(options) - _OPTION_KEYS
    if unknown:
        raise ValueError(f"unknown fxmem options {sorted(unknown)}; known: {sorted(_OPTION_KEYS)}")
    budget = _resolve_budget(options)
    allow = check_allow(options.get("allow", ("recompute",)))
    precision = backend_precision(options.get("precision"))
    if precision is not None and "precision" not in allow:
        raise ValueError(f"precision={precision!r} casts the step's compute, a lossy lever: "
                         "allow it with allow=(..., 'precision')")
    if "sparse" in allow:
        raise ValueError(
            "the sparse lever cannot run through the torch.compile backend: it replaces the "
            "model's layers and their parameters, and a backend is handed a traced graph, not "
            "the model: use fxmem.optimize(model, budget, allow=(..., 'sparse')), or sparsify "
            "the model yourself before compiling it (model = fxmem.sparsify(model, density), "
            "the optimizer built after; the backend then plans the sparse layers it sees)")
    state = step = 0
    optimizer = options.get("optimizer")
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        state, step = optimizer_bytes(optimizer, params)
    plan_options = PlanOptions(
        budget=budget, allow=allow,
        strategy=options.get("strategy", "ilp"), time_limit=float(options.get("time_limit", 30.0)),
        safety_margin=None if options.get("safety_margin") is None
        else float(options["safety_margin"]),  # None: default_margin, once the device is known
        cost=options.get("cost", "roofline"), lowering=options.get("lowering", "inductor"),
        store_8bit=check_stored_bits(options.get("stored_bits", 16), allow) == 8,
    )
    return (plan_options, StepContext.of_optimizer(state, step),
            bool(options.get("exact_random", True)))

LAST_PLANS = PlanLog()  # plans made through torch.compile(backend="fxmem"), newest last


def fxmem_backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None):
    """``torch.compile(model, backend="fxmem", options={"budget": ...})``."""
    plan_options, context, exact_random = options_from_mapping(options)
    casts = None
    if "precision" in plan_options.allow:
        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)),
                      torch.device("cpu"))
        forced = backend_precision((options or {}).get("precision")) is not None
        casts = casts_for(device, torch.bfloat16, "Forced by precision='bf16'" if forced else
                          "Planned with them because the exact levers alone do not fit the "
                          "graph under the budget")
    backend = make_backend(plan_options, LAST_PLANS, context=context, exact_random=exact_random,
                           casts=casts, forced=casts is not None and forced)
    return backend(gm, example_inputs)
