"""Run a training step as k microbatches whose gradients add up to the whole batch's.

Peak activation memory grows with the batch; splitting it into microbatches of ``n_j`` samples,
running forward and backward on each and summing the gradients trades time for that memory. The
loss is a weighted average over the batch (see :mod:`fxmem.batch_analysis`): with microbatch
weights ``w_j`` (elements for a mean, non-ignored targets for a cross-entropy with
``ignore_index``, 1 for a sum) and ``W = sum_j w_j`` (1 for a sum), the whole batch's loss is
``sum_j (w_j / W) * loss_j`` and so is its gradient. Each microbatch's backward therefore runs
with ``w_j / W`` as its incoming gradient, so the accumulated buffers need no final division.

:func:`run_microbatched` returns a loss tensor whose backward hands those buffers to ``.grad``, so
the user's ``loss.backward(); opt.step()`` loop is unchanged. Each microbatch's graph is freed
before the next one runs: the peak is one microbatch's activations plus the gradient buffers
(:func:`accumulated_gradient_bytes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch

from fxmem.levers.microbatch.analysis import BatchAnalysis
from fxmem.errors import MicrobatchError
from fxmem.passes.microbatch_draws import DrawStep, cache_bytes, drawing

__all__ = ["MICROBATCH_COUPLING_OPTION", "COUPLING_CHOICES", "MicrobatchReport",
           "accumulated_gradient_bytes", "check_microbatchable", "microbatch_part",
           "microbatch_report", "part_is_view", "run_microbatched", "split_sizes"]

log = logging.getLogger(__name__)

#: The ``fxmem.optimize`` option that accepts ops mixing samples (BatchNorm in training mode) and
#: runs them per microbatch; "refuse" (the default) raises :class:`MicrobatchError` instead.
MICROBATCH_COUPLING_OPTION = "microbatch_coupling"
COUPLING_CHOICES = ("refuse", "per-microbatch")


def split_sizes(batch: int, k: int) -> list[int]:
    """k microbatch sizes summing to ``batch``: ``k - 1`` of ``ceil(batch / k)`` and a last,
    possibly smaller one with the rest (10, 3 -> [4, 4, 2]). When that would leave the last empty
    (9, 4 -> [3, 3, 3, 0]) the first ``batch % k`` get ``ceil`` and the others ``floor``
    ([3, 2, 2, 2]). Either way at most two sizes occur: at most two compiled shapes."""
    if not isinstance(batch, int) or not isinstance(k, int) or batch < 1:
        raise ValueError(f"batch must be a positive int and k an int, got {batch!r} and {k!r}")
    if not 1 <= k <= batch:
        raise ValueError(f"cannot split a batch of {batch} into {k} microbatches: "
                         f"k must be between 1 and {batch}")
    big = -(-batch // k)
    if (k - 1) * big < batch:
        return [big] * (k - 1) + [batch - (k - 1) * big]
    return [big] * (batch % k) + [batch // k] * (k - batch % k)


def accumulated_gradient_bytes(params) -> int:
    """Bytes of the gradient buffers the microbatches accumulate into (one per trainable
    parameter, in its dtype): they stay alive from the first microbatch to the user's backward."""
    return sum(p.numel() * p.element_size() for p in params if p.requires_grad)


@dataclasses.dataclass(frozen=True)
class MicrobatchReport:
    """What a microbatched step does, for the plan's report."""

    sizes: tuple[int, ...]
    reduction: str
    notes: tuple[str, ...]

    def __str__(self) -> str:
        head = (f"microbatching: k={len(self.sizes)} microbatches of {list(self.sizes)} samples, "
                f"loss reduction {self.reduction!r}")
        return "\n".join([head, *(f"  {n}" for n in self.notes)])


def _coupling_lines(analysis: BatchAnalysis, limit: int = 10) -> list[str]:
    """One line per op that mixes samples; the random draws in one line (where they are)."""
    mixing = [c for c in analysis.coupling if c.kind != "random"]
    lines = [f"  - {c}" for c in mixing[:limit]]
    if len(mixing) > limit:
        lines.append(f"  - ... and {len(mixing) - limit} more")
    drawn = [c for c in analysis.coupling if c.kind == "random"]
    if drawn:
        where = sorted({c.source.split(" (")[0] for c in drawn if c.source})
        at = f" at {', '.join(where[:6])}{', ...' if len(where) > 6 else ''}" if where else ""
        lines.append(f"  - {len(drawn)} random ops (dropout){at}: {drawn[0].detail}")
    return lines


def check_microbatchable(analysis: BatchAnalysis, *, allow_coupling: bool = False) -> None:
    """Raise :class:`MicrobatchError` unless microbatching the step is exact, or its ops that mix
    samples are accepted (``allow_coupling``). A loss that is not a mean or sum over the batch is
    refused either way: no microbatch weights can reproduce it."""
    if analysis.reduction is None:
        raise MicrobatchError(f"cannot split this step into microbatches: {analysis.reason}. "
                              "Make the loss a mean or sum over the batch (e.g. "
                              "F.cross_entropy(..., reduction='mean')), or do not allow the "
                              "'microbatch' lever")
    if analysis.coupling and not allow_coupling:
        random = any(c.kind == "random" for c in analysis.coupling)
        raise MicrobatchError("\n".join([
            "cannot split this step into microbatches exactly: its forward mixes samples across "
            "the batch or draws random numbers:", *_coupling_lines(analysis),
            *(["With exact_random=True (the default), microbatches read the whole batch's "
                "draws of the random ops fxmem can draw once (dropout, bernoulli(p), rand_like, "
                "randn_like) instead."] if random else []),
            "Each microbatch would compute these over its own samples only (for BatchNorm: "
            "per-microbatch statistics, as Sohoni et al. 2019 do; running statistics are still "
            "updated once per step; for dropout: masks of the same distribution drawn per "
            "microbatch, not the whole batch's). To accept that, pass allow=(\"recompute\", \"microbatch\") "
            f"and {MICROBATCH_COUPLING_OPTION}=\"per-microbatch\" to fxmem.optimize; otherwise "
            "use a batch-independent layer (GroupNorm, LayerNorm) or another lever."]))


def microbatch_report(analysis: BatchAnalysis, sizes: Sequence[int]) -> MicrobatchReport:
    """Describe what :func:`run_microbatched` does with ``sizes`` for this step."""
    k = len(sizes)
    notes = [{"mean": "microbatches weighted by their number of samples (a mean over the batch)",
              "sum": "microbatch losses and gradients added (a sum over the batch)",
              "mean_over_targets": "microbatches weighted by their non-ignored targets (a "
                                   "cross-entropy mean with ignore_index or class weights)",
              }.get(analysis.reduction, str(analysis.reason))]
    bn = [c for c in analysis.coupling if c.kind == "batch_norm"]
    if bn:
        momenta = sorted({"None (cumulative average)" if c.momentum is None else f"{c.momentum:g}"
                          for c in bn})
        notes.append(f"BatchNorm uses per-microbatch statistics (k={k}, {len(bn)} layers); "
                     f"running statistics are updated once per step with momentum "
                     f"{', '.join(momenta)}, from the size-weighted mean of the microbatches' "
                     "statistics")
    read = [d for d in analysis.draws if d is not None]
    if read and k > 1:
        notes.append(f"random ops ({len(read)}, e.g. dropout) read the whole batch's values, "
                     "drawn once for the step in eager's order: the same values as the whole "
                     "batch under the same seed; kept, each microbatch's until it ends "
                     f"({cache_bytes(analysis.draws, sizes) / 2**20:.2f} MiB at most)")
    drawn = [c for c in analysis.coupling if c.kind == "random"]
    if drawn:
        notes.append(f"random ops ({len(drawn)}) draw per microbatch: the same "
                     "distribution, not the whole batch's values under the same seed")
    for c in analysis.coupling:
        if c.kind not in ("batch_norm", "random"):
            notes.append(f"runs per microbatch, unlike the whole batch: {c}")
    return MicrobatchReport(tuple(sizes), str(analysis.reduction), tuple(notes))


class _Holder:
    """The accumulated gradients, until a backward hands them over (then None)."""

    __slots__ = ("grads",)

    def __init__(self, grads):
        self.grads = grads


class _MicrobatchedLoss(torch.autograd.Function):
    """The whole batch's loss; its backward delivers the accumulated gradients to the params."""

    @staticmethod
    def forward(ctx, holder, loss, *params):
        ctx.holder = holder  # nothing saved: the caller may scale the loss in place (the HF
        return loss.clone()  # Trainer does); a second backward is refused below

    @staticmethod
    def backward(ctx, grad):
        grads, ctx.holder.grads = ctx.holder.grads, None
        if grads is None:
            raise RuntimeError("a microbatched fxmem step delivers its gradients once: a second "
                               "backward of its loss is not supported")
        if not bool((grad == 1).all()):  # loss * 0.5, GradScaler: scale in place
            for g in grads:
                if g is not None:
                    g.mul_(grad)
        # the holder let go and this frame's list dies on return: no other reference stays, so
        # AccumulateGrad steals each buffer into .grad when .grad is None (no copy)
        return (None, None, *grads)


def microbatch_part(t: torch.Tensor, dim: int | None, start: int, n: int) -> torch.Tensor:
    """Samples ``start`` to ``start + n`` of ``t`` along its batch dim ``dim`` (None: not split,
    ``t`` itself): a view of ``t``, or a contiguous copy where ``t`` is contiguous and the view
    would not be (:func:`part_is_view`)."""
    if dim is None:
        return t
    part = t.narrow(dim, start, n)
    return part.contiguous() if t.is_contiguous() and not part.is_contiguous() else part


def part_is_view(t: torch.Tensor, dim: int | None, start: int, n: int) -> bool:
    """Whether :func:`microbatch_part` returns a view of ``t`` (sharing its storage)."""
    return dim is None or not (t.is_contiguous() and not t.narrow(dim, start, n).is_contiguous())


def run_microbatched(
    fn: Callable[..., Sequence[torch.Tensor]],
    tensors: Sequence[torch.Tensor],
    *,
    analysis: BatchAnalysis,
    sizes: Sequence[int],
    params: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor] = (),
    allow_coupling: bool = False,
    batch_dims: Sequence[int | None] | None = None,
    draw_random: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run ``fn(*tensors) -> (loss, *held)`` on each microbatch and accumulate the gradients of
    ``params`` (those requiring grad). Returns ``(loss, held)``: the whole batch's loss, whose
    ``backward()`` delivers the gradients to ``.grad`` as the whole batch's backward would, and
    the held outputs (detached) concatenated along ``analysis.output_batch_dims``; an unbatched
    held output is the last microbatch's.

    ``tensors`` are the step's flat inputs, in ``analysis.input_paths`` order; ``batch_dims``
    overrides ``analysis.flat_batch_dims``. ``buffers`` are the buffers the forward updates
    (``analysis.mutated_buffers``, e.g. BatchNorm's): each microbatch starts from their values
    before the step; afterwards a float buffer holds the size-weighted mean of its values after
    each microbatch (one momentum step with the mean of the microbatches' statistics), an integer
    one (``num_batches_tracked``) its value after one microbatch.

    ``draw_random``: ``fn``'s random ops read the whole batch's draws (``analysis.draws``; the
    microbatch-draws pass rewrote its graphs): the step's draw cache is active around the loop.
    A step with such draws is refused without it (unless ``allow_coupling``): ``fn`` would draw
    per microbatch."""
    check_microbatchable(analysis, allow_coupling=allow_coupling)
    if analysis.draws and not draw_random and not allow_coupling:
        raise MicrobatchError(
            "this step draws random numbers (dropout): it is split exactly only when its random "
            "ops read the whole batch's draws (fxmem.optimize's graphs do: draw_random=True), "
            "else each microbatch would draw its own")
    tensors = list(tensors)
    dims = tuple(analysis.flat_batch_dims if batch_dims is None else batch_dims)
    _checked_batch_size(tensors, dims, sizes)
    with drawing(analysis.draws, sizes) if draw_random and analysis.draws \
            else contextlib.nullcontext() as draws:
        return _run(fn, tensors, dims, analysis, sizes, params, buffers, draws)


def _run(fn, tensors, dims, analysis, sizes, params, buffers, draws: DrawStep | None):
    """The microbatch loop of :func:`run_microbatched` (``draws``: the step's draw cache)."""
    total = sum(sizes)
    params = [p for p in params if p.requires_grad]
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    part = lambda j: [microbatch_part(t, d, starts[j], sizes[j]) for t, d in zip(tensors, dims)]
    weights, scales = _loss_scales(analysis, part, len(sizes))
    with torch.no_grad():
        snapshot = [b.clone() for b in buffers] if len(sizes) > 1 else []
    mixed: list[torch.Tensor | None] = [None] * len(buffers)
    acc: list[torch.Tensor | None] = [None] * len(params)
    held: list[torch.Tensor] = []
    loss_sum = None
    for j, (n, start, scale) in enumerate(zip(sizes, starts, scales)):
        if j:
            _copy_into(buffers, snapshot)
        skip = scale == 0  # no weight (every target ignored): outputs only, no gradient
        if draws is not None:
            draws.at(j)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not skip):
            out = fn(*part(j))
        loss_j, outs = out[0], out[1:]
        if not skip and params:
            _accumulate_gradients(acc, params, loss_j, scale)
        dtype = loss_j.dtype
        term = loss_j.detach().double() * scale if not skip else 0.0  # skip: 0/0 = nan
        loss_sum = term if loss_sum is None else loss_sum + term
        _gather(held, outs, analysis.output_batch_dims, j, n, start, total)
        _mix_buffers(mixed, buffers, j, n / total)
        del out, loss_j, outs
    _copy_into(buffers, mixed)
    loss = _MicrobatchedLoss.apply(_Holder(acc), loss_sum.to(dtype), *params)
    del acc
    log.debug("microbatched step: sizes %s, weights %s", list(sizes), weights)
    return loss, tuple(held)


def _checked_batch_size(tensors, dims, sizes) -> int:
    """The batch size ``sizes`` add up to; :class:`MicrobatchError` unless there is a batch dim
    per input (None: unbatched), every batched input has that batch size and no size is empty."""
    if len(dims) != len(tensors):
        raise MicrobatchError(f"{len(tensors)} input tensors but batch dims for {len(dims)}")
    total = sum(sizes)
    found = {t.shape[d] for t, d in zip(tensors, dims) if d is not None}
    if found != {total} or any(n < 1 for n in sizes):
        raise MicrobatchError(f"microbatch sizes {list(sizes)} do not split the inputs' batch "
                              f"sizes {sorted(found)}")
    return total


def _loss_scales(analysis: BatchAnalysis, part, k: int) -> tuple[list[float], list[float]]:
    """The k microbatches' weights ``w_j`` (``part(j)``: microbatch j's inputs) and the scales
    ``w_j / W`` of their losses (``W``: 1 for a sum, else the weights' total; nan when it is 0)."""
    # every weight first (the normaliser needs them all), read with one device sync
    weights = torch.stack([analysis.weight_fn(part(j)).double() for j in range(k)]).tolist()
    norm = 1.0 if analysis.reduction == "sum" else sum(weights)
    return weights, [w / norm if norm else float("nan") for w in weights]


def _accumulate_gradients(acc: list, params: list, loss: torch.Tensor, scale: float) -> None:
    """Add the gradients of ``scale * loss`` with respect to ``params`` into ``acc`` (one buffer
    per param; a param's first gradient becomes its buffer when its strides are the param's,
    else a copy laid out like the param)."""
    grads = torch.autograd.grad(loss, params, torch.full_like(loss, scale), allow_unused=True)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if acc[i] is None:  # the first gradient becomes the buffer, unless it overlaps
            acc[i] = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
        else:
            acc[i].add_(g)


def _copy_into(buffers: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Copy ``values`` into ``buffers`` in place, outside autograd."""
    with torch.no_grad():
        for b, v in zip(buffers, values):
            b.copy_(v)


def _mix_buffers(mixed: list, buffers: Sequence[torch.Tensor], j: int, share: float) -> None:
    """Fold the buffers' values after microbatch j (``share``: its fraction of the batch) into
    ``mixed``: a float buffer's size-weighted mean, an integer buffer's first value."""
    with torch.no_grad():
        for i, b in enumerate(buffers):
            if not b.is_floating_point():
                mixed[i] = b.clone() if j == 0 else mixed[i]
            elif j == 0:
                mixed[i] = b * share
            else:
                mixed[i].add_(b, alpha=share)


def _gather(held, outs, out_dims, j, n, start, total):
    """Copy microbatch j's held outputs into whole-batch buffers (allocated at the first)."""
    if len(outs) != len(out_dims):
        raise MicrobatchError(f"the step returned {len(outs)} held outputs, the analysis "
                              f"expected {len(out_dims)}")
    for i, (h, d) in enumerate(zip(outs, out_dims)):
        h = h.detach()
        if d is None:  # not batched: the last microbatch's
            if j == 0:
                held.append(h)
            else:
                held[i] = h
            continue
        f = h.shape[d] // n  # rows per sample along d
        if j == 0:
            shape = list(h.shape)
            shape[d] = f * total
            held.append(h.new_empty(shape))
        held[i].narrow(d, start * f, n * f).copy_(h)
