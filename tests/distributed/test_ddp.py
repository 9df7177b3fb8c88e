"""DistributedDataParallel with fxmem on one process: the orders refused. The budgets on 2 gloo
ranks are in test_gloo_ranks.py."""

import tempfile

import pytest
import torch
import torch.distributed as dist


def test_ddp_outside_is_refused_inside(tmp_path):
    """fxmem wraps the model, DDP wraps fxmem: optimize_ddp(DDP(model)) is a clear error, and
    without a process group optimize_ddp says what to call."""
    from fxmem.distributed import optimize_ddp

    with pytest.raises(RuntimeError, match="init_process_group"):
        optimize_ddp(torch.nn.Linear(2, 2), "1GiB")
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0,
                            world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        with pytest.raises(ValueError, match="not DistributedDataParallel"):
            optimize_ddp(wrapped, "1GiB")
    finally:
        dist.destroy_process_group()
