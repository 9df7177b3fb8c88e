"""The precision lever: bf16 compute casts (matrix products, convolutions, attention) with fp32
master weights, planned only when the exact levers cannot meet the budget. See
:mod:`fxmem.levers.precision.lever`."""

from fxmem.levers.precision.casts import ComputeCasts, casting, casts_for, run_with_casts
from fxmem.levers.precision.fallback import exact_first
from fxmem.levers.precision.lever import PrecisionLever
from fxmem.levers.precision.record import PrecisionRecord

__all__ = ["ComputeCasts", "PrecisionLever", "PrecisionRecord", "casting", "casts_for",
           "exact_first", "run_with_casts"]
