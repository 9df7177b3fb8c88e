"""FSDP2 (fully_shard) with fxmem on one process: the configurations refused. The budgets on 2
gloo ranks are in test_gloo_ranks.py."""

import tempfile

import pytest
import torch
import torch.distributed as dist


def test_unsupported_fsdp_configurations_are_clear_errors():
    """No process group, DDP, a model already sharded, an optimizer of another model's tensors,
    one that has stepped or is not modelled, other levers: refused (before fully_shard)."""
    from torch.distributed.fsdp import fully_shard

    from fxmem.distributed import optimize_fsdp

    with pytest.raises(RuntimeError, match="init_process_group"):
        optimize_fsdp(torch.nn.Linear(2, 2), "1GiB")
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0,
                            world_size=1)
    try:
        blocks = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)]))
        with pytest.raises(ValueError, match="not DistributedDataParallel"):
            optimize_fsdp(torch.nn.parallel.DistributedDataParallel(blocks), "1GiB")
        other = torch.nn.Linear(2, 2)
        with pytest.raises(ValueError, match="not parameters of the model"):
            optimize_fsdp(blocks, "1GiB", optimizer=torch.optim.SGD(other.parameters()))
        stepped = torch.optim.AdamW(blocks.parameters())
        blocks[0][0](torch.ones(1, 2)).sum().backward()
        stepped.step()
        with pytest.raises(ValueError, match="has state"):
            optimize_fsdp(blocks, "1GiB", optimizer=stepped)
        blocks.zero_grad(set_to_none=True)
        with pytest.raises(TypeError, match="torch.optim.Optimizer"):
            optimize_fsdp(blocks, "1GiB", optimizer=blocks.parameters())
        with pytest.raises(NotImplementedError, match="optimizer_memory models only"):
            optimize_fsdp(blocks, "1GiB", optimizer=torch.optim.Adagrad(blocks.parameters()))
        with pytest.raises(ValueError, match="recomputation only"):
            optimize_fsdp(blocks, "1GiB", allow=("recompute", "microbatch"))
        with pytest.raises(ValueError, match="lowering must be one of"):
            optimize_fsdp(blocks, "1GiB", lowering="tvm")  # before fully_shard: checked below
        uneven = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2),
                                                          torch.nn.Linear(2, 3)]))
        with pytest.raises(NotImplementedError, match="one structure"):
            optimize_fsdp(uneven, "1GiB")
        fully_shard(blocks)
        with pytest.raises(ValueError, match="before fully_shard"):
            optimize_fsdp(blocks, "1GiB")
    finally:
        dist.destroy_process_group()


def test_units_run_without_fxmems_backend_are_an_error():
    """Past TorchDynamo's recompile limit the units run uncompiled, so unplanned: an error,
    not a silent overshoot of the budget."""
    import torch._dynamo

    from fxmem.distributed import optimize_fsdp
    from tests.helpers import make_tiny_gpt

    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0,
                            world_size=1)
    try:
        model, (idx, tgt), _ = make_tiny_gpt(n_layer=1, dropout=0.0, vocab=32, seq=8, batch=2,
                                             d_model=16)
        model = optimize_fsdp(model, "1GiB", lowering="eager")
        with torch._dynamo.config.patch(recompile_limit=0), \
                pytest.raises(RuntimeError, match="recompile_limit"):
            model(idx, tgt)
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
