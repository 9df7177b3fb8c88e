"""``fxmem.optimize``: a module whose training step fits a memory budget, in the user's own loop.

    model = fxmem.optimize(model, budget="2GiB", optimizer=opt)
    loss = model(x, y); loss.backward(); opt.step(); opt.zero_grad()
    print(model.plan.report())

The first call for each input signature (shapes, dtypes, devices, non-tensor arguments) captures
the step with TorchDynamo (as one graph: a graph break is a :class:`CaptureError` naming it) and
AOTAutograd, whose partitioner is fxmem's planner: the forward and backward graphs it returns save
what the solver chose and recompute the rest. By default TorchInductor compiles those graphs;
``lowering="eager"`` runs them as FX code (the memory model's own semantics, for debugging).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx

from fxmem.graph import torch_compat
from fxmem.graph.torch_compat import pytree
from fxmem.budget import BudgetError, parse_budget
from fxmem.graph.capture import _model_device
from fxmem.errors import FxmemError, StepInputError
from fxmem.api.backend import PlanLog, PlanReady, make_backend
from fxmem.api.proxy import ModelProxy
from fxmem.levers.microbatch.lever import MicrobatchDecision, MicrobatchLever
from fxmem.levers.microbatch.runtime import COUPLING_CHOICES
from fxmem.levers.precision import ComputeCasts, PrecisionLever, casting, exact_first
from fxmem.levers.precision.fallback import check_precision, check_stored_bits
from fxmem.levers.precision.loss_scale import (LossScaler, LossScaling, check_loss_scaling,
                                               loss_scale_line)
from fxmem.levers.sparse.fallback import SparseFallback, check_sparse_density
from fxmem.planning.options import EXACT_LEVERS, PlanOptions, StepContext, check_allow
from fxmem.planning.planner import Plan, optimizer_bytes
from fxmem.api.step_module import StepModule, own_code, rebuild_output

__all__ = ["optimize", "floor", "OptimizedModule"]


log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Compiled:
    fn: Callable
    plans: PlanLog
    layout: tuple
    micro: MicrobatchDecision | None = None
    run_micro: Callable | None = None  # the microbatch loop around fn
    casts: ComputeCasts | None = None  # the precision lever's
    scaler: LossScaler | None = None  # fp16's loss scaling around fn


class OptimizedModule(ModelProxy):
    """Wraps a model; plans on the first call for each input signature. ``plan`` is the latest.

    It stands for the model (:class:`fxmem.api.proxy.ModelProxy`): ``forward``'s signature,
    ``named_parameters()``, ``state_dict()`` keys (no prefix; the same Parameter objects) and
    unknown attributes (``config``, ``save_pretrained``...) are the model's; ``module`` is the
    model. ``optimizer`` may be set after construction (the Hugging Face Trainer makes its
    optimizer late): the plans made so far are dropped, and the next call plans again."""

    def __init__(self, model, options: PlanOptions, *, optimizer=None, loss_fn=None,
                 microbatches: int | None = None,
                 microbatch_coupling: str = "refuse", batch_dims=None, exact_random: bool = True,
                 loss_scaling: LossScaling | None = LossScaling(),
                 precision: torch.dtype | None = None, sparse_density: float | None = None):
        super().__init__(model)
        self._precision = precision  # a compute dtype forced by optimize(precision=...)
        self._sparse = SparseFallback(sparse_density)  # the sparse lever: last, if allowed
        self._exact_random = exact_random
        self._microbatches = microbatches
        self._coupling = microbatch_coupling
        self._batch_dims = batch_dims
        self._options = options
        self._optimizer = optimizer
        self._loss_fn = loss_fn
        self._compiled: dict[Any, _Compiled] = {}
        self._last: _Compiled | None = None
        self._beside: dict[str, int] = {}  # bytes held beside the step (DDP's buckets)
        self._loss_scaling = loss_scaling  # fp16's loss scaling options (None: off)
        self._scaler: LossScaler | None = None  # made by the first fp16 plan

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose state and step count against the budget."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is self._optimizer:
            return
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if self._compiled:
            log.info("fxmem: a new optimizer; the %d plan(s) made are dropped",
                     len(self._compiled))
        self._optimizer = optimizer
        if self._scaler is not None:  # a step whose backward overflowed skips it
            self._scaler.attach(optimizer)
        self._compiled.clear()
        self._last = None

    def hold_beside(self, nbytes: Mapping[str, int]) -> None:
        """Count ``nbytes`` (by category, e.g. ``{"communication buffers": n}``), which a wrapper
        holds beside the step for as long as it lives (DDP's gradient buckets), against the
        budget; the plans made so far are dropped."""
        held = {str(k): int(v) for k, v in nbytes.items()}
        if any(v < 0 for v in held.values()):
            raise ValueError(f"held bytes must be non-negative, got {held}")
        if held != self._beside:
            self._beside = held
            self._compiled.clear()
            self._last = None

    @property
    def plan(self) -> Plan:
        """The plan of the latest call's input signature."""
        if self._last is None:
            raise RuntimeError("no plan yet: call the module on a batch first")
        plan = self._last.plans.latest
        if self._last.micro is not None:
            plan.microbatch = self._last.micro.report
        if _is_fp16(self._last.casts):
            plan.loss_scale = loss_scale_line(self._loss_scaling, self._scaler)
        return plan

    @property
    def loss_scaler(self) -> LossScaler | None:
        """fp16's loss scaling (its scale, the steps it skipped), made by the first fp16 plan;
        None before, and with ``loss_scaling="off"``."""
        return self._scaler

    @property
    def plans(self) -> list[Plan]:
        """The plans of every input signature seen so far."""
        return [p for c in self._compiled.values() for p in c.plans.plans]

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled() or not self.module.training:
            return self.module(*args, **kwargs)  # inference: no backward to plan for
        leaves, spec = pytree.tree_flatten((args, kwargs))
        slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        tensors = [leaves[i] for i in slots]
        key = _signature(leaves, spec, slots)
        compiled = self._compiled.get(key)
        if compiled is not None:
            return self._run(key, compiled, leaves, spec, tensors)

        def attempt(casts: ComputeCasts | None):  # planned on the first call of a signature
            compiled = self._compile(leaves, spec, slots, tensors, casts=casts)
            self._compiled[key] = compiled
            return self._run(key, compiled, leaves, spec, tensors)

        # the exact levers first; bf16 compute casts only if they cannot meet the budget; sparse
        # weights only if neither can (fxmem.levers.sparse.fallback)
        return self._sparse.plan(self, lambda: exact_first(
            attempt, self._options.allow, _model_device(self.module), forced=self._precision,
            optimizer=self._optimizer),
            args, kwargs, runs=True)

    def _run(self, key, compiled: _Compiled, leaves, spec, tensors):
        """The step run through ``compiled`` (planned and compiled on its first run)."""
        self._last = compiled
        try:
            with torch_compat.one_graph_capture():  # a warning in forward is no graph break
                if compiled.run_micro is not None:
                    loss, held = compiled.run_micro(tensors)
                    return rebuild_output(compiled.layout, loss, held)
                outputs = compiled.fn(*tensors)
        except torch_compat.DYNAMO_BACKEND_COMPILER_FAILED() as exc:
            self._compiled.pop(key, None)
            inner = getattr(exc, "inner_exception", None)
            if isinstance(inner, FxmemError):  # BudgetError and friends, not wrapped
                raise inner.with_traceback(None) from None
            raise
        except torch_compat.DYNAMO_UNSUPPORTED() as exc:
            self._compiled.pop(key, None)
            from fxmem.graph.capture import _capture_failure

            args_, kwargs_ = pytree.tree_unflatten(leaves, spec)
            raise _capture_failure(exc, self.module, args_, kwargs_, self._loss_fn,
                                   _model_device(self.module)) from exc
        loss = outputs[0] if compiled.scaler is None else compiled.scaler.watch(outputs[0])
        return rebuild_output(compiled.layout, loss, outputs[1:])

    def plan_for(self, *args, **kwargs) -> Plan:
        """The plan for a step on these inputs, made without generating kernels or running the
        step (so without allocating its activations); raises :class:`fxmem.BudgetError` as the
        first call would. The module is left as it was: its first call still plans."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        tensors = [leaves[i] for i in slots]

        def attempt(casts: ComputeCasts | None) -> Plan:
            return self._plan_once(leaves, spec, slots, tensors, casts)

        return self._sparse.plan(self, lambda: exact_first(
            attempt, self._options.allow, _model_device(self.module), forced=self._precision,
            optimizer=self._optimizer),
            args, kwargs, runs=False)

    def _plan_once(self, leaves, spec, slots, tensors, casts: ComputeCasts | None) -> Plan:
        compiled = self._compile(leaves, spec, slots, tensors, stop_after_plan=True, casts=casts)
        try:
            with torch.enable_grad(), torch_compat.one_graph_capture():
                # a microbatched step plans its first microbatch's graph
                if compiled.run_micro is not None:
                    compiled.run_micro(tensors)
                else:
                    compiled.fn(*tensors)
        except torch_compat.DYNAMO_BACKEND_COMPILER_FAILED() as exc:
            inner = getattr(exc, "inner_exception", None)
            if isinstance(inner, PlanReady):
                plan = inner.plan
                if compiled.micro is not None:
                    plan.microbatch = compiled.micro.report
                if _is_fp16(casts):
                    plan.loss_scale = loss_scale_line(self._loss_scaling, self._scaler)
                return plan
            if isinstance(inner, FxmemError):
                raise inner.with_traceback(None) from None
            raise
        raise RuntimeError("the step compiled without being planned")  # fxmem's bug

    def _compile(self, leaves, spec, slots, tensors, *, stop_after_plan: bool = False,
                 casts: ComputeCasts | None = None) -> _Compiled:
        device = _model_device(self.module)
        for t in tensors:
            if t.device != device:
                raise StepInputError(f"an input is on {t.device} but the model is on {device}")
        constants = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        step = StepModule(self.module, self._loss_fn, constants, spec, slots, casts=casts)
        try:
            layout = step.output_layout(tensors)
        except FxmemError:
            raise
        except Exception as exc:  # data-dependent Python: not one graph
            from fxmem.graph.capture import _capture_failure

            args_, kwargs_ = pytree.tree_unflatten(leaves, spec)
            raise _capture_failure(exc, self.module, args_, kwargs_, self._loss_fn, device) from exc
        options = self._options
        if options.safety_margin is None:
            options = dataclasses.replace(options, safety_margin=options.margin_for(device))
        if casts is not None:  # with the compute casts, saved values may be stored low too: in
            # bf16 whatever the compute dtype (fp32's range; an fp16 copy would overflow)
            options = dataclasses.replace(options, store_low=torch.bfloat16)
        context = StepContext()
        if self._optimizer is not None:
            grads = [p for p in self.module.parameters() if p.requires_grad]
            context = StepContext.of_optimizer(*optimizer_bytes(self._optimizer, grads))
        context = context.plus(self._beside)
        micro = lever = None
        if "microbatch" in options.allow or self._microbatches:
            lever = MicrobatchLever(self.module, options, loss_fn=self._loss_fn,
                                    batch_dims=self._batch_dims, coupling=self._coupling,
                                    microbatches=self._microbatches,
                                    exact_random=self._exact_random)
            with casting(casts):  # k priced on the step as it will run
                micro = lever.decide(leaves, spec, slots, context)
            if micro is not None:
                context = micro.context
        plans = PlanLog()
        backend = make_backend(options, plans, context=context, exact_random=self._exact_random,
                               stop_after_plan=stop_after_plan,
                               hint=lever.hint if lever is not None else None,
                               annotate=PrecisionLever(casts).annotate if casts else None,
                               draws=micro.draws if micro is not None else None)
        fn = torch.compile(own_code(step), backend=backend, fullgraph=True, dynamic=False)
        run_micro = lever.runtime(fn, micro) if lever is not None else None
        scaler = None if stop_after_plan else self._scaler_for(casts)
        if scaler is not None and run_micro is not None:  # each microbatch's backward scaled
            run_micro = scaler.microbatched(fn, lambda f: lever.runtime(f, micro))
        return _Compiled(fn=fn, plans=plans, layout=layout, micro=micro, run_micro=run_micro,
                         casts=casts, scaler=scaler)

    def _scaler_for(self, casts: ComputeCasts | None) -> LossScaler | None:
        """The loss scaler of a step with ``casts``: fp16 with loss scaling on (one per module,
        kept across input signatures), else None."""
        if not _is_fp16(casts) or self._loss_scaling is None:
            return None
        if self._scaler is None:
            self._scaler = LossScaler(self.module.parameters(), self._loss_scaling)
            self._scaler.attach(self._optimizer)
        return self._scaler


def _is_fp16(casts: ComputeCasts | None) -> bool:
    return casts is not None and casts.dtype == torch.float16


def _signature(leaves, spec, slots) -> tuple:
    sig = []
    for i, x in enumerate(leaves):
        if i in slots:
            sig.append((tuple(x.shape), x.dtype, x.device, x.requires_grad))
        else:
            try:
                hash(x)
                sig.append(("const", x))
            except TypeError:
                sig.append(("const", repr(x)))
    return (spec, tuple(sig))


def optimize(
    model: torch.nn.Module,
    budget: int | str,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    allow: Iterable[str] = EXACT_LEVERS,
    strategy: str = "ilp",
    lowering: str = "inductor",
    time_limit: float = 30.0,
    safety_margin: float | None = None,
    cost: str = "roofline",
    microbatches: int | None = None,
    microbatch_coupling: str = "refuse",
    batch_dims: Mapping[str, int | None] | None = None,
    exact_random: bool = True,
    loss_scaling: str | LossScaling = "auto",
    precision: str | None = None,
    sparse_density: float | None = None,
    stored_bits: int = 16,
) -> OptimizedModule:
    """A module whose training step's peak memory stays under ``budget`` (bytes or "2GiB").

    ``allow`` names the levers a plan may use; by default the exact ones, recompute and
    microbatch. ``strategy`` picks the solver ("ilp", "greedy", "checkpoint-blocks", "save-all");
    ``lowering`` compiles the rewritten graphs with TorchInductor ("inductor", the default) or
    runs them as FX code ("eager": the memory model's own semantics, for debugging).
    ``cost="profile"`` times the graph's ops instead of the roofline estimate. With
    ``"microbatch"`` in ``allow`` the plan may split the batch into k microbatches whose
    gradients accumulate (k chosen with recomputation, the fastest predicted pair under the
    budget); ``microbatches=k`` forces k. Ops that mix samples (BatchNorm in training) are refused
    unless ``microbatch_coupling="per-microbatch"`` (a BudgetError then says whether a split would
    have fitted). ``batch_dims`` ({input path such as "args[0]" or "kwargs['labels']": dim or
    None}) overrides the batch dimension found.
    ``safety_margin`` plans for that fraction under the budget, for kernels' scratch memory the
    graph does not show; default :func:`fxmem.planning.options.default_margin` (1%; 3% for
    Inductor on a GPU, whose buffers fxmem has not measured against Triton's).
    ``precision="fp16"`` casts to fp16 whatever the budget, as ``"bf16"`` does below; its
    backward then runs with dynamic loss scaling in the user's own loop (``loss_scaling="auto"``,
    or a :class:`~fxmem.levers.precision.LossScaling` with other options; state in
    ``module.loss_scaler``; an overflowing backward's gradients are set to None, so the
    optimizer's step skips them: :mod:`fxmem.levers.precision.loss_scale`). A user who scales the
    loss with their own ``torch.amp.GradScaler`` passes ``loss_scaling="off"``.
    ``precision``: None (default) casts the step's compute to bf16 only when ``"precision"`` is
    allowed and the exact levers cannot meet the budget; ``"bf16"`` casts it whatever the budget
    (``"precision"`` must be allowed), the exact levers planning on top.
    With ``"sparse"`` in ``allow``, when the other allowed levers (exact, then precision) cannot
    meet the budget, the model's Linear/Conv2d layers are sparsified in place at the least
    sparsity whose plan fits (densities 0.5, 0.3, 0.2, 0.1, 0.05) and ``optimizer`` is pointed at
    their values (:mod:`fxmem.levers.sparse.fallback`); a BudgetError leaves the model as it was.
    ``sparse_density`` (in (0, 1), needs ``"sparse"`` allowed) forces that density.
    ``stored_bits``: with the precision lever, saved activations may be stored in bf16 (16, the
    default) or also in 8 bits (8: int8 codes with an fp32 scale per 128 values, lossier,
    opt-in; :mod:`fxmem.levers.precision.stored_8bit`), the solver choosing per value.
    ``exact_random`` (with ``lowering="inductor"``): True (default) draws random ops (dropout) as
    eager PyTorch does, so the step's values and gradients equal eager's under the same seed;
    False lets Inductor fuse them into its kernels with its own seeded generator, as
    ``torch.compile`` does by default (a recomputed random op still reproduces the forward's
    values, but they differ from eager's; not faster on a CPU). A step split into microbatches
    draws its random ops for the whole batch once and each microbatch reads its slice: dropout
    is split exactly (a coupling if False).
    """
    if not isinstance(model, torch.nn.Module):
        raise StepInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(exact_random, bool):
        raise TypeError(f"exact_random must be a bool, got {type(exact_random).__name__}")
    allow = check_allow(allow)
    scaling = check_loss_scaling(loss_scaling)
    forced_dtype = check_precision(precision, allow)
    forced_density = check_sparse_density(sparse_density, allow)
    store_8bit = check_stored_bits(stored_bits, allow) == 8
    allow = _with_forced_microbatches(allow, microbatches, microbatch_coupling)
    options = PlanOptions(budget=parse_budget(budget), allow=allow, strategy=strategy,
                          lowering=lowering, time_limit=time_limit,
                          safety_margin=safety_margin, cost=cost, store_8bit=store_8bit)
    return OptimizedModule(model, options, optimizer=optimizer, loss_fn=loss_fn,
                           loss_scaling=scaling,
                           microbatches=microbatches, microbatch_coupling=microbatch_coupling,
                           batch_dims=batch_dims, exact_random=exact_random,
                           precision=forced_dtype, sparse_density=forced_density)


def _with_forced_microbatches(allow: frozenset, microbatches, coupling: str) -> frozenset:
    """``allow`` with the microbatch lever when ``microbatches`` forces k > 1; the microbatch
    options checked."""
    if coupling not in COUPLING_CHOICES:
        raise ValueError(f"microbatch_coupling must be one of {COUPLING_CHOICES}, "
                         f"got {coupling!r}")
    if microbatches is not None and (not isinstance(microbatches, int) or microbatches < 1):
        raise ValueError(f"microbatches must be a positive int, got {microbatches!r}")
    return allow | {"microbatch"} if microbatches and microbatches > 1 else allow


def floor(
    model: torch.nn.Module,
    *args,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    allow: Iterable[str] = EXACT_LEVERS,
    lowering: str = "inductor",
    time_limit: float = 30.0,
    safety_margin: float | None = None,
    precision: str | None = None,
    sparse_density: float | None = None,
    stored_bits: int = 16,
    **kwargs,
) -> int:
    """The smallest budget (bytes) fxmem can meet for ``model``'s step on these inputs with the
    levers in ``allow``: the :attr:`fxmem.BudgetError.floor` a 1-byte budget reports, found
    without generating kernels or running the step. ``kwargs`` are the model's. With
    ``"sparse"`` allowed, the lower of the other levers' floor and the model's at the sparsest
    density tried (0.05); the model is left as it was."""
    module = optimize(model, 1, optimizer=optimizer, loss_fn=loss_fn, allow=allow,
                      lowering=lowering, time_limit=time_limit, safety_margin=safety_margin,
                      precision=precision, sparse_density=sparse_density,
                      stored_bits=stored_bits)
    try:
        plan = module.plan_for(*args, **kwargs)
    except BudgetError as exc:
        return int(exc.floor)
    return int(plan.budget)  # a 1-byte budget met: nothing is held
