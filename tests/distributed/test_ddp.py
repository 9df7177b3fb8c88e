"""DistributedDataParallel over fxmem's step on 2 CPU ranks (gloo): a budget sweep where each
rank's measured peak is at or under its budget and within 3% of the prediction, DDP's gradient
buckets counted, and the gradients are DDP-without-fxmem's."""

import copy
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
FRACTIONS = (0.1, 0.4, 0.7, 1.0)  # of the way from the floor to the unoptimised peak


def _rank_step(rank: int, world: int, init_file: str, results: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    try:
        _sweep(rank, results)
    finally:
        dist.destroy_process_group()


def _sweep(rank: int, results: str) -> None:
    import fxmem
    from fxmem.distributed import bucket_bytes, measure_rank_step, optimize_ddp
    from tests.helpers import grads_of, make_tiny_gpt

    base, (idx, tgt), _ = make_tiny_gpt(dropout=0.0, seed=0)  # the same weights on each rank
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    idx, tgt = (torch.randint(0, 512, idx.shape, generator=g) for _ in range(2))
    reference = copy.deepcopy(base)
    _, expected = grads_of(reference, torch.nn.parallel.DistributedDataParallel(reference),
                           idx, tgt)
    options = dict(lowering="eager", allow=("recompute",), time_limit=2.0)
    probe = optimize_ddp(copy.deepcopy(base), 1, **options)
    with pytest.raises(fxmem.BudgetError) as info:
        probe.module.plan_for(idx, tgt)
    floor, top = info.value.floor, info.value.unoptimized
    lines = []
    for fraction in FRACTIONS:
        model = copy.deepcopy(base)
        budget = int(floor + fraction * (top - floor))
        ddp = optimize_ddp(model, budget, **options)
        for _ in range(2):  # plan, compile, and DDP's first iterations
            ddp(idx, tgt).backward()
            model.zero_grad(set_to_none=True)

        def step():
            ddp(idx, tgt).backward()

        measured = measure_rank_step(step, ddp, [model, [idx, tgt]]).peak
        got = [p.grad.clone() for p in model.parameters()]
        plan = ddp.module.plan
        assert plan.context.constant.get("communication buffers") == bucket_bytes(ddp) > 0
        for a, b in zip(expected, got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert measured <= budget, (rank, budget, measured)
        assert abs(measured - plan.predicted_peak) <= 0.03 * measured
        lines.append(f"{rank} {budget} {plan.predicted_peak} {measured} "
                     f"{plan.solution.num_recomputed}\n")
    with open(f"{results}.{rank}", "w") as f:
        f.writelines(lines)


@pytest.mark.slow
def test_ddp_budget_sweep_on_two_gloo_ranks(tmp_path):
    init_file, results = str(tmp_path / "init"), str(tmp_path / "rank")
    mp.spawn(_rank_step, args=(WORLD, init_file, results), nprocs=WORLD)
    rows = [line.split() for r in range(WORLD) for line in open(f"{results}.{r}")]
    assert len(rows) == WORLD * len(FRACTIONS)
    assert any(int(row[4]) > 0 for row in rows)  # the tighter budgets recompute
    for rank, budget, predicted, measured, _ in rows:
        print(f"rank {rank}: budget {budget} predicted {predicted} measured {measured}")


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
