"""Train the bench GPT with DDP under a per-rank byte budget, launched with torchrun.

    torchrun --nproc-per-node 2 bench/ddp_gpt.py --fraction 0.5 --steps 4

Each rank builds the same GPT (``bench.workloads.gpt_decoder``, reduced by default so two CPU
ranks train it in about a minute), draws its own batch, and trains it through
``fxmem.distributed.optimize_ddp`` with AdamW counted, at a budget ``--fraction`` of the way from
fxmem's floor to the step's unoptimised peak (gloo on CPUs, NCCL on GPUs). Every rank prints its
plan's report and, per step, its measured peak (bytes live at the step's start, DDP's gradient
buckets included, plus the allocator's events) against its budget; rank 0 writes the table to
``bench/results/ddp_gpt.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import gpt_decoder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="the budget, this far from the floor (0) to the peak (1)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--lowering", default="inductor", choices=["eager", "inductor"])
    ns = parser.parse_args(argv)
    import fxmem
    from fxmem.budget import format_bytes
    from fxmem.distributed import measure_rank_step, optimize_ddp

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
        if backend == "nccl" else torch.device("cpu")
    w = gpt_decoder(batch=4, seq=128, n_layer=ns.layers, d_model=ns.d_model)
    model = w["model"].to(device)
    g = torch.Generator().manual_seed(rank)
    idx = torch.randint(0, 8192, w["args"][0].shape, generator=g).to(device)
    tgt = torch.randint(0, 8192, w["args"][1].shape, generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    options = dict(optimizer=opt, lowering=ns.lowering, allow=("recompute",), time_limit=10.0)
    try:
        optimize_ddp(model, 1, **options).module.plan_for(idx, tgt)
    except fxmem.BudgetError as err:
        floor, top = err.floor, err.unoptimized
    budget = int(floor + ns.fraction * (top - floor))
    ddp = optimize_ddp(model, budget, **options)
    rows = []
    for step in range(ns.steps):
        def train_step():
            ddp(idx, tgt).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if step < 2:  # plans and compiles; DDP's first iterations
            train_step()
            continue
        peak = measure_rank_step(train_step, ddp, [model, opt, [idx, tgt]]).peak
        rows.append((rank, step, budget, ddp.module.plan.predicted_peak, peak))
    print(f"rank {rank} of {world} ({backend}): budget {format_bytes(budget)}\n"
          f"{ddp.module.plan.report()}", flush=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        lines = ["# DDP over fxmem, per-rank budget", "",
                 f"`torchrun --nproc-per-node {world} bench/ddp_gpt.py --fraction {ns.fraction} "
                 f"--steps {ns.steps} --layers {ns.layers} --d-model {ns.d_model} "
                 f"--lowering {ns.lowering}` ({backend}, {device.type}); GPT {ns.layers} layers, "
                 f"d_model {ns.d_model}, batch 4 x 128 per rank, AdamW; floor "
                 f"{format_bytes(floor)}, unoptimised peak {format_bytes(top)}.", "",
                 "| rank | step | budget | predicted | measured | within | error |",
                 "|---|---|---|---|---|---|---|"]
        for r, s, b, p, m in (row for part in gathered for row in part):
            lines.append(f"| {r} | {s} | {b} | {p} | {m} | {'yes' if m <= b else 'NO'} | "
                         f"{100 * (p - m) / m:+.2f}% |")
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "ddp_gpt.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
