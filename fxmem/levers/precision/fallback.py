"""Exact levers first; bf16 compute only when they cannot meet the budget.

``fxmem.optimize(precision="bf16" | "fp16")`` forces the casts instead (fp16 with loss scaling,
:mod:`fxmem.levers.precision.loss_scale`); the fallback itself always casts to bf16, which needs
no loss scaling.

``fxmem.optimize`` plans a step with the exact levers it is allowed (recompute, microbatch). Only
when that raises :class:`~fxmem.budget.BudgetError` and ``"precision"`` is allowed does it plan
again with the compute casts (and the exact levers on top). When neither fits, the error's
``floor`` is the lower of the two floors: the smallest budget any allowed combination meets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from fxmem.budget import BudgetError, format_bytes
from fxmem.levers.precision.casts import ComputeCasts, casts_for

__all__ = ["exact_first", "combined_error", "low_bit_state_hint", "PRECISION", "PRECISION_MODES",
           "check_precision", "check_stored_bits"]

log = logging.getLogger(__name__)

PRECISION = "precision"
# ``fxmem.optimize(precision=...)``: None lets the planner cast only when the exact levers cannot
# meet the budget; a dtype name casts the step's compute whatever the budget
PRECISION_MODES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                   "fp16": torch.float16, "float16": torch.float16}
T = TypeVar("T")


def check_precision(precision: str | None, allow) -> torch.dtype | None:
    """The compute dtype ``precision`` forces (None: the planner's choice). Forcing needs
    ``"precision"`` in ``allow``: it is the lossy lever, opt-in."""
    if precision is None:
        return None
    if not isinstance(precision, str) or precision not in PRECISION_MODES:
        raise ValueError(f"precision must be None (cast only where the budget needs it) or one "
                         f"of {sorted(PRECISION_MODES)}, got {precision!r}")
    if PRECISION not in allow:
        raise ValueError(f"precision={precision!r} casts the step's compute, a lossy lever: "
                         "allow it with allow=(..., 'precision')")
    return PRECISION_MODES[precision]


def check_stored_bits(stored_bits: int, allow) -> int:
    """``fxmem.optimize(stored_bits=...)``: 16 (bf16, the default) or 8, which needs
    ``"precision"`` in ``allow`` (lossier than bf16, opt-in)."""
    if isinstance(stored_bits, bool) or stored_bits not in (16, 8):
        raise ValueError(f"stored_bits must be 16 (saved values stored in bf16 at most) or 8 "
                         f"(in 8 bits too), got {stored_bits!r}")
    if stored_bits == 8 and PRECISION not in allow:
        raise ValueError("stored_bits=8 stores saved activations in 8 bits, a lossy lever: "
                         "allow it with allow=(..., 'precision')")
    return stored_bits


def exact_first(attempt: Callable[[ComputeCasts | None], T], allow, device: torch.device | str,
                dtype: torch.dtype = torch.bfloat16, *, forced: torch.dtype | None = None,
                optimizer: torch.optim.Optimizer | None = None) -> T:
    """``attempt(None)`` (the exact levers); if it raises BudgetError and ``allow`` holds
    ``"precision"``, ``attempt(casts)`` with bf16 compute casts on ``device``. A BudgetError of
    both has the lower floor (:func:`combined_error`). ``forced``: cast the compute to that
    dtype whatever the budget (``fxmem.optimize(precision=...)``), without the exact attempt.
    ``optimizer``: the user's; a BudgetError with the precision lever says how many bytes its
    state would take in fewer bits (:func:`low_bit_state_hint`)."""
    if forced is not None:
        try:
            return attempt(casts_for(device, forced, "Forced by precision="
                                     + str(forced).removeprefix("torch.")))
        except BudgetError as err:
            raise err.with_hint(low_bit_state_hint(optimizer)) from None
    try:
        return attempt(None)
    except BudgetError as exact:
        if PRECISION not in allow:
            raise
        reason = ("Planned with them because the exact levers alone need "
                  + (f"{format_bytes(exact.floor)} ({exact.floor} bytes)"
                     if exact.floor is not None else "more than the budget"))
        casts = casts_for(device, dtype, reason)
        log.info("fxmem: the exact levers do not fit (%s); planning with %s compute casts",
                 str(exact).splitlines()[0], casts.dtype_name)
        try:
            return attempt(casts)
        except BudgetError as low:
            raise combined_error(exact, low, casts).with_hint(
                low_bit_state_hint(optimizer)) from None


def low_bit_state_hint(optimizer) -> str | None:
    """What :func:`fxmem.low_bit_optimizer` would save on ``optimizer``'s state, for a
    BudgetError that the precision lever did not avoid (None: nothing to say). The user's loop
    steps its own optimizer object, so fxmem says how rather than swapping it."""
    if optimizer is None:
        return None
    from fxmem.levers.precision.optimizer_state import low_bit_hint

    try:
        return low_bit_hint(optimizer)
    except (NotImplementedError, ValueError, TypeError) as exc:  # a hint never hides the error
        log.debug("fxmem: no low-bit optimizer state hint: %s", exc)
        return None


def combined_error(exact: BudgetError, low: BudgetError, casts: ComputeCasts) -> BudgetError:
    """One BudgetError for a budget neither the exact levers nor bf16 compute meet: its floor
    the lower of the two, its holders that floor's, ``unoptimized`` the exact step's."""
    floors = [f for f in (exact.floor, low.floor) if f is not None]
    floor = min(floors) if floors else None
    holders = low.holders if floor is not None and floor == low.floor else exact.holders
    if floor is not None and floor == exact.floor and floor != low.floor:  # exact is lower:
        # its error leads, so the first line names the floor the error carries
        message = (f"{exact}\n(with {casts.dtype_name} compute casts, the precision lever: "
                   + (f"smallest feasible budget {format_bytes(low.floor)}, {low.floor} bytes, "
                      "higher: the casts' copies cost more than they save here)"
                      if low.floor is not None else "no floor known)"))
    else:
        message = (f"{low}\n(with {casts.dtype_name} compute casts, the precision lever; the "
                   "exact levers alone: "
                   + (f"smallest feasible budget {format_bytes(exact.floor)}, {exact.floor} "
                      "bytes)" if exact.floor is not None else "no floor known)"))
    return BudgetError(message, floor=floor, holders=holders,
                       unoptimized=exact.unoptimized if exact.unoptimized is not None
                       else low.unoptimized)
