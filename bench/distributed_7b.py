"""Per-rank memory of a 7B-parameter decoder at 8, 64 and 512 ranks, on paper.

The step is fxmem's model (``fxmem.estimate``) of a GPT built on the meta device (nothing is
allocated): 32 layers, d_model 4096, 32 heads, vocabulary 32000, context 4096, tied embeddings
(6.6B parameters), no dropout, one sequence of 4096 tokens per rank, AdamW. Each rank's peak under DDP and
under FSDP2 comes from :func:`fxmem.distributed.sharding.per_rank` (sharded parameters,
gradients and optimizer state; all-gathered blocks; DDP's buckets). Nothing here is measured.
Writes ``bench/results/distributed_7b.{md,json}``.

    python bench/distributed_7b.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxmem  # noqa: E402
from fxmem.budget import format_bytes  # noqa: E402
from fxmem.distributed.sharding import per_rank  # noqa: E402
from fxmem.examples import GPT, GPTConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORLDS = (8, 64, 512)


def build():
    cfg = GPTConfig(vocab_size=32000, n_layer=32, n_head=32, d_model=4096, max_seq_len=4096,
                    dropout=0.0)
    with torch.device("meta"):
        model = GPT(cfg).train()
        idx = torch.randint(0, cfg.vocab_size, (1, 4096))
        targets = torch.randint(0, cfg.vocab_size, (1, 4096))
    return model, idx, targets


def main() -> int:
    t0 = time.perf_counter()
    model, idx, targets = build()
    opt = torch.optim.AdamW(model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    est = fxmem.estimate(model, idx, targets, optimizer=opt)
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in model.blocks)
    in_blocks = {id(p) for b in model.blocks for p in b.parameters()}
    root = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_blocks)
    rows = [dict(strategy="one device", world=1, peak=est.peak, at=est.peak_at,
                 breakdown=est.breakdown())]
    for world in WORLDS:
        for strategy in ("ddp", "fsdp2"):
            r = per_rank(est.timeline, world, strategy=strategy, block_bytes=block,
                         root_bytes=root)
            rows.append(dict(strategy=strategy, world=world, peak=r.peak, at=r.at,
                             breakdown=r.breakdown))
    seconds = time.perf_counter() - t0
    lines = ["# Per-rank memory of a 6.6B-parameter decoder (on paper)", "",
             f"`python bench/distributed_7b.py` ({seconds:.0f} s): GPT with 32 layers, d_model "
             f"4096, 32 heads, vocabulary 32000, {n_params / 1e9:.2f}B parameters (fp32), one "
             "sequence of 4096 tokens per rank, AdamW, nothing recomputed; built on the meta "
             "device. The step is fxmem.estimate's timeline; each rank's share is "
             "fxmem.distributed.sharding.per_rank (FSDP2: parameters, gradients and AdamW state "
             f"sharded, two blocks all-gathered ({format_bytes(block)} each) and one block's "
             f"gradients unsharded, the root's {format_bytes(root)} unsharded throughout; DDP: "
             "buckets the size of the gradients). Predictions of fxmem's model, not "
             "measurements. Attention is the math path on the meta device (softmax "
             "probabilities of 32 heads x 4096^2 held per layer, 2 GiB each); a GPU's flash "
             "attention keeps only their log-sum-exp, so activations there are far smaller.", "",
             "| strategy | ranks | per-rank peak | at | parameters | gradients | optimizer "
             "state | activations | communication / unsharded |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["breakdown"]
        acts = sum(v for k, v in b.items() if k in ("saved activations", "temporaries",
                                                    "inputs", "outputs"))
        lines.append(
            f"| {r['strategy']} | {r['world']} | {format_bytes(r['peak'])} | {r['at']} | "
            f"{format_bytes(b.get('parameters', 0))} | {format_bytes(b.get('gradients', 0))} | "
            f"{format_bytes(b.get('optimizer state', 0))} | {format_bytes(acts)} | "
            f"{format_bytes(b.get('communication buffers', 0))} |")
    lines += ["", "Activations do not shrink with ranks (each rank runs its own sequence): at 512 "
              "ranks they are most of what FSDP2 leaves on a rank, which is where fxmem's "
              "recomputation and microbatching plan under the per-rank budget."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed_7b.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "distributed_7b.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
