"""The microbatch lever: split the batch into k microbatches whose gradients accumulate.

- analyse: the step captured at the whole batch -> its batch dimensions, the ops that mix samples
  and the loss's reduction (:func:`fxmem.levers.microbatch.analysis.analyze_batch`);
- decide: k, jointly with recomputation -- the fastest predicted pair under the budget
  (:func:`fxmem.levers.microbatch.choice.choose_microbatches`), or the k the user forced;
- apply: the compiled step is the microbatch's; its random ops (dropout) read the whole batch's
  draws, made once per step (the microbatch-draws pass,
  :mod:`fxmem.passes.microbatch_draws`, which the backend runs on each microbatch's joint
  graph). What the microbatched step holds beyond that graph -- gradient buffers, the rest of
  the batch's inputs and outputs, the whole batch's draws -- is added to the planner's
  :class:`~fxmem.planning.options.StepContext`;
- runtime: the loop around the compiled step (:func:`fxmem.levers.microbatch.runtime.run_microbatched`).

Exact for models that keep samples apart, dropout included (with ``exact_random``, or the eager
lowering); across BatchNorm in training only when the user allows per-microbatch statistics (then
the report says the numerics changed).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import torch

from fxmem.errors import MicrobatchError
from fxmem.graph.capture import capture_step
from fxmem.graph.torch_compat import pytree
from fxmem.levers.base import Lever, register
from fxmem.levers.microbatch.analysis import BatchAnalysis, analyze_batch
from fxmem.levers.microbatch.choice import (MicrobatchChoice, candidate_ks, choose_microbatches,
                                            extra_resident)
from fxmem.levers.microbatch.runtime import (
    MicrobatchReport,
    check_microbatchable,
    microbatch_report,
    run_microbatched,
    split_sizes,
)
from fxmem.passes.microbatch_draws import DrawDecision, cache_bytes
from fxmem.planning.options import PlanOptions, StepContext

__all__ = ["MicrobatchLever", "MicrobatchDecision"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MicrobatchDecision:
    """How to split the batch, and what the runtime loop needs."""

    analysis: BatchAnalysis
    sizes: tuple[int, ...]
    allow_coupling: bool
    buffers: list  # buffers the step mutates (BatchNorm's running statistics)
    report: MicrobatchReport
    choice: MicrobatchChoice | None = None  # None when k was given
    context: StepContext = StepContext()  # what the split step holds beyond its graph
    draws: DrawDecision | None = None  # the microbatch-draws pass's decision (None: no draws)


@register
class MicrobatchLever(Lever):
    name = "microbatch"
    exact = True  # for models that keep samples apart (see the module's docstring)

    def __init__(self, model: torch.nn.Module, options: PlanOptions, *, loss_fn=None,
                 batch_dims=None, coupling: str = "refuse", microbatches: int | None = None,
                 exact_random: bool = True):
        self.model, self.options, self.loss_fn = model, options, loss_fn
        # the graphs draw as eager does (FX code; Inductor with fallback_random): their random
        # ops can read the whole batch's draws
        self.exact_random = exact_random or options.lowering == "eager"
        self.batch_dims, self.microbatches = batch_dims, microbatches
        self.allow_coupling = coupling == "per-microbatch"
        self.hint: str | None = None  # why a step over the budget was not split (decide)

    def analyse(self, leaves, spec) -> tuple[Any, BatchAnalysis]:
        """The whole batch's captured step and its batch analysis (traced once per scope of a
        joint exploration, :mod:`fxmem.planning.reuse`: the same for every microbatch count)."""
        from fxmem.planning.reuse import memoised

        def analysed():
            args, kwargs = pytree.tree_unflatten(leaves, spec)
            whole = capture_step(self.model, args, kwargs, loss_fn=self.loss_fn)
            return whole, analyze_batch(whole, self.batch_dims, exact_random=self.exact_random)

        inputs = tuple((id(x), tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor)
                       else repr(x) for x in leaves)
        autocast = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                         for d in ("cpu", "cuda"))
        key = (id(self.model), id(self.loss_fn), repr(self.batch_dims), self.exact_random,
               repr(spec), inputs, autocast)
        return memoised("microbatch batch analysis", key, analysed)

    def decide(self, leaves, spec, slots, context: StepContext) -> MicrobatchDecision | None:
        """The split to run (None: the whole batch at once), chosen with recomputation under the
        budget; ``context`` is what the step holds beyond its graph (the optimizer). A step that
        cannot be split exactly (its forward mixes samples, or its loss is no mean or sum over
        the batch) is run whole unless the user forced ``microbatches``; :attr:`hint` then says,
        for a BudgetError, whether and how microbatching would have fitted."""
        whole, analysis = self.analyse(leaves, spec)
        nodes = {n.name: n for n in whole.gm.graph.nodes}
        held_bytes = sum(nodes[h].meta["val"].untyped_storage().nbytes()
                         for h in whole.held_outputs)
        self.hint = None
        choice = None
        if self.microbatches:
            sizes = tuple(split_sizes(analysis.batch_size, self.microbatches))
        else:
            choose = functools.partial(
                choose_microbatches, self.model, leaves, spec, slots, analysis=analysis,
                options=self.options, context=context, loss_fn=self.loss_fn,
                held_bytes=held_bytes, whole=whole)
            usable = self.splittable(analysis)
            choice = choose(candidates=None if usable else [1])
            if not usable and not choice.feasible:
                self.hint = self._skipped(analysis, choose)
            sizes = choice.sizes
            log.info("%s", choice.summary())
            if not choice.feasible and len(sizes) > 1:
                self.hint = (f"planned with {len(sizes)} microbatches of {sizes[0]} samples, the "
                             "split with the smallest floor")
        if len(sizes) == 1:
            return None
        check_microbatchable(analysis, allow_coupling=self.allow_coupling)
        params = [p for p in self.model.parameters() if p.requires_grad]
        extra = extra_resident([leaves[s] for s in slots], held_bytes, sizes,
                               analysis.flat_batch_dims, params,
                               cache_bytes(analysis.draws, sizes))
        buffers = [self.model.get_buffer(name) for name in analysis.mutated_buffers]
        draws = DrawDecision(analysis.draws, sizes) if analysis.draws else None
        return MicrobatchDecision(analysis, sizes, self.allow_coupling, buffers,
                                  microbatch_report(analysis, sizes), choice,
                                  context=context.plus(extra), draws=draws)

    def splittable(self, analysis: BatchAnalysis) -> bool:
        """Whether the lever may split this step: its loss is a mean or sum over the batch and
        its forward keeps samples apart (or the user accepts per-microbatch coupling)."""
        return analysis.reduction is not None and (not analysis.coupling or self.allow_coupling)

    def _skipped(self, analysis: BatchAnalysis, choose) -> str:
        """Why microbatching was skipped, for a step that does not fit whole; with whether a
        split would have fitted, when the loss could be split."""
        try:
            check_microbatchable(analysis, allow_coupling=self.allow_coupling)
        except MicrobatchError as exc:
            reason = str(exc)
        ks = candidate_ks(analysis.batch_size)[1:]
        if analysis.reduction is None or not ks:
            return "microbatching was not tried: " + reason
        # the smallest microbatches hold the least: if they do not fit, no split does
        smallest = choose(candidates=ks[-1:], find_floor=False).options[0]
        verdict = (f"splitting the batch (into {smallest.k} microbatches) would fit this budget, "
                   "but was skipped: " if smallest.feasible else
                   "microbatching (which would not fit either) was skipped: ")
        return verdict + reason

    def runtime(self, fn, decision: MicrobatchDecision | None):
        """``fn`` (the compiled step on one microbatch's tensors) run over the microbatches:
        ``(tensors) -> (loss, held outputs)`` of the whole batch."""
        if decision is None:
            return None
        params = [p for p in self.model.parameters() if p.requires_grad]
        return functools.partial(run_microbatched, fn, analysis=decision.analysis,
                                 sizes=decision.sizes, params=params, buffers=decision.buffers,
                                 allow_coupling=decision.allow_coupling,
                                 draw_random=decision.draws is not None)
