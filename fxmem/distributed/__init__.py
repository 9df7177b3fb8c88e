"""fxmem past one device: each rank's step under the rank's budget (DDP; FSDP2 to come)."""

from fxmem.distributed.ddp import bucket_bytes, measure_rank_step, optimize_ddp

__all__ = ["optimize_ddp", "bucket_bytes", "measure_rank_step"]
