"""The precision lever: bf16 compute casts (matrix products, convolutions, attention) with fp32
master weights, planned only when the exact levers cannot meet the budget, or bf16/fp16 forced
(fp16 with dynamic loss scaling, :mod:`fxmem.levers.precision.loss_scale`). See
:mod:`fxmem.levers.precision.lever`."""

from fxmem.levers.precision.casts import ComputeCasts, casting, casts_for, run_with_casts
from fxmem.levers.precision.fallback import exact_first
from fxmem.levers.precision.lever import PrecisionLever
from fxmem.levers.precision.loss_scale import LossScaler, LossScaling
from fxmem.levers.precision.record import PrecisionRecord

__all__ = ["ComputeCasts", "LossScaler", "LossScaling", "PrecisionLever", "PrecisionRecord",
           "casting", "casts_for", "exact_first", "run_with_casts"]
