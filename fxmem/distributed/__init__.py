"""fxmem past one device: each rank's step under the rank's budget (DDP and FSDP2)."""

from fxmem.distributed.ddp import bucket_bytes, measure_rank_step, optimize_ddp
from fxmem.distributed.fsdp import FsdpStep, measure_fsdp_step, optimize_fsdp

__all__ = ["optimize_ddp", "bucket_bytes", "measure_rank_step", "optimize_fsdp", "FsdpStep",
           "measure_fsdp_step"]
