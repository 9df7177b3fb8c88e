"""Train the bench GPT with FSDP2 (``fully_shard``) under a per-rank byte budget, launched with
torchrun.

    torchrun --nproc-per-node 2 bench/fsdp_gpt.py --fractions 0.1,0.4,0.7,0.9 \
        --lowering eager,inductor

Each rank builds the same GPT (``bench.workloads.gpt_decoder``, reduced by default so two CPU
ranks sweep it in a few minutes), draws its own batch, and for each budget (``--fractions`` of
the way from fxmem's floor to the step's unoptimised peak) shards it with
``fxmem.distributed.optimize_fsdp`` (``fully_shard`` on each block and on the root, each block
a graph planned by fxmem, run as FX code or lowered through Inductor: ``--lowering``) and
measures one step (forward and backward) on each rank: the bytes
live at its start (the parameter shards and the batch) plus the allocator's events. The
gradient shards are compared with FSDP2's without fxmem under the same seed (dropout
included). Rank 0 writes the table to ``bench/results/fsdp_gpt.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import gpt_decoder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _grads(model):
    return [p.grad.to_local().clone() for p in model.parameters()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.1,0.4,0.7,0.9",
                        help="budgets, this far from the floor (0) to the peak (1)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--lowering", default="eager,inductor",
                        help="how the unit graphs run, one sweep each: eager (FX code), inductor")
    ns = parser.parse_args(argv)
    lowerings = ns.lowering.split(",")
    if not set(lowerings) <= {"eager", "inductor"}:
        parser.error(f"--lowering: eager, inductor or both, got {ns.lowering}")
    import fxmem
    from fxmem.budget import format_bytes
    from fxmem.distributed import measure_fsdp_step, optimize_fsdp
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    w = gpt_decoder(batch=ns.batch, seq=ns.seq, n_layer=ns.layers, d_model=ns.d_model,
                    vocab_size=ns.vocab)
    base = w["model"]  # train mode: dropout 0.1
    g = torch.Generator().manual_seed(rank)
    idx, tgt = (torch.randint(0, ns.vocab, (ns.batch, ns.seq), generator=g) for _ in range(2))

    reference = copy.deepcopy(base)
    for block in reference.blocks:
        fully_shard(block)
    fully_shard(reference)
    torch.manual_seed(1000 + rank)
    reference(idx, tgt).backward()
    expected = _grads(reference)
    del reference

    rows, report, bounds = [], "", {}
    for lowering, fraction in ((lo, float(f)) for lo in lowerings
                               for f in ns.fractions.split(",")):
        options = dict(lowering=lowering, time_limit=5.0)
        if lowering not in bounds:
            try:
                optimize_fsdp(copy.deepcopy(base), 1, **options)(idx, tgt)
                raise AssertionError("a 1-byte budget planned")
            except fxmem.BudgetError as err:
                bounds[lowering] = err.floor, err.unoptimized
        floor, top = bounds[lowering]
        budget = int(floor + fraction * (top - floor))
        model = copy.deepcopy(base)
        model = optimize_fsdp(model, budget, units=model.blocks, **options)
        for _ in range(2):  # plans and compiles; FSDP2's lazy initialisation
            model(idx, tgt).backward()
            model.zero_grad(set_to_none=True)

        def step():
            torch.manual_seed(1000 + rank)
            model(idx, tgt).backward()

        measured = measure_fsdp_step(step, model, [idx, tgt]).peak
        equal = True
        for a, b in zip(expected, _grads(model)):
            try:
                torch.testing.assert_close(b, a)
            except AssertionError:
                equal = False
        fsdp = model.fxmem_fsdp
        rows.append((rank, lowering, fraction, budget, fsdp.predicted_peak, measured,
                     fsdp.plan.solution.num_recomputed, equal))
        report = fsdp.report()
        del model
    print(f"rank {rank} of {world} (gloo): last budget's report\n{report}", flush=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, (rows, report))
    if rank == 0:
        lines = ["# FSDP2 (fully_shard) over fxmem, per-rank budget", "",
                 f"`torchrun --nproc-per-node {world} bench/fsdp_gpt.py --fractions "
                 f"{ns.fractions} --layers {ns.layers} --d-model {ns.d_model} --batch {ns.batch}"
                 f" --seq {ns.seq} --vocab {ns.vocab} --lowering {ns.lowering}` (gloo, cpu, "
                 f"torch {torch.__version__}); GPT {ns.layers} layers, d_model {ns.d_model}, "
                 f"vocabulary {ns.vocab}, dropout 0.1, batch {ns.batch} x {ns.seq} per rank; "
                 f"fully_shard on each block and the root, each block compiled with fxmem (its "
                 f"graph run as FX code, eager, or lowered through Inductor, its plan made with "
                 f"the memory model of that lowering); one step (forward and backward) measured "
                 f"per budget. "
                 + "; ".join(f"{lo}: floor {format_bytes(f)}, unoptimised peak "
                             f"{format_bytes(t)} per rank" for lo, (f, t) in bounds.items())
                 + ".", "",
                 "| rank | lowering | fraction | budget | predicted | measured | within | error "
                 "| recomputed | gradients equal FSDP2's |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for part, _ in gathered:
            for r, lo, f, b, p, m, k, eq in part:
                lines.append(f"| {r} | {lo} | {f} | {b} | {p} | {m} | "
                             f"{'yes' if m <= b else 'NO'} | {100 * (p - m) / m:+.2f}% | {k} | "
                             f"{'yes' if eq else 'NO'} |")
        lines += ["", f"Rank 0's report at the last budget ({lowerings[-1]}):", "", "```",
                  gathered[0][1], "```"]
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "fsdp_gpt.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines[:len(rows) * world + 6]))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
