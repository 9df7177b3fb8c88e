"""Every lever allowed, used the way a user's own code would (issue 20, before it is resolved).

Three paths, each on a model fxmem's authors did not write or a shape they did not plan for:

- ``loop``: a Hugging Face ``LlamaForCausalLM`` built from a config, trained by a plain loop
  (``fxmem.optimize(model, budget, optimizer=opt, allow=ALL)``, then ``loss.backward()``,
  ``opt.step()``, ``opt.zero_grad()``) at ``--loop-fraction`` of its eager step's measured peak.
- ``trainer``: a Hugging Face ``BertForSequenceClassification`` under the ``Trainer``
  (``fxmem.integrations.huggingface.optimize_trainer(trainer, budget, allow=ALL)``) at
  ``--trainer-mib``.
- ``breaks``: a model with two graph breaks (``tests/api/test_graph_breaks.py``'s
  ``BreakBetweenStages``), sparsified by the user (``fxmem.sparsify``) and compiled with the
  fxmem backend (``allow=("recompute", "microbatch", "precision")``: the backend is handed traced
  graphs, so the sparse lever is the user's call there) at ``--breaks-fraction`` of its eager
  peak; and ``fxmem.optimize`` on the same model, which must refuse it with a clear error.

Each row: the budget, fxmem's predicted and the allocator's measured peak of a steady step
(``fxmem.measure_memory`` with the model, optimizer and batch as the baseline), the levers the
plan used, and whether the weights changed. Writes ``bench/results/user_paths.{md,json}``.

    OMP_NUM_THREADS=1 python bench/user_paths.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxmem  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MiB = 2**20
ALL = ("recompute", "microbatch", "precision", "sparse")


def _levers(plan) -> str:
    line = next((ln.strip() for ln in plan.report().splitlines()
                 if ln.strip().startswith("levers used")), "")
    levers = re.sub(r"\s*\([^()]*\)", "", line.removeprefix("levers used:")).strip()
    k = re.search(r"microbatch \(k=(\d+)\)", line)
    density = re.search(r"sparse \(density ([0-9.]+)\)", line)
    return (levers.replace("microbatch", f"microbatch k={k.group(1)}" if k else "microbatch")
            .replace("sparse", f"sparse {density.group(1)}" if density else "sparse"))


def _peak(step, baseline) -> int:
    return fxmem.measure_memory(step, device="cpu", baseline=baseline).peak


def loop(ns) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=344,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 1024, (8, 128), generator=torch.Generator().manual_seed(1))

    def train_step(call):
        def step():
            loss = call(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return step

    losses: list[float] = []
    train_step(model)()  # AdamW's state made
    eager = _peak(train_step(model), [model, opt, ids])
    budget = int(ns.loop_fraction * eager)
    module = fxmem.optimize(model, budget, optimizer=opt, allow=ALL, time_limit=ns.time_limit)
    before = model.lm_head.weight.detach().clone()
    losses.clear()
    train_step(module)()  # plans and compiles
    measured = _peak(train_step(module), [model, opt, ids])
    train_step(module)()
    return {"path": "loop", "model": "LlamaForCausalLM (2 layers, d 128, GQA), AdamW, 8x128",
            "eager": eager, "budget": budget, "predicted": module.plan.predicted_peak,
            "measured": measured, "levers": _levers(module.plan),
            "trained": not torch.equal(model.lm_head.weight, before),
            "detail": f"losses {', '.join(f'{v:.3f}' for v in losses)}"}


def trainer(ns, tmp: Path) -> dict:
    from transformers import (BertConfig, BertForSequenceClassification, Trainer,
                              TrainingArguments)

    from fxmem.integrations.huggingface import optimize_trainer

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=256, max_position_embeddings=64)
    model = BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, 512, (64,), generator=g),
             "attention_mask": torch.ones(64, dtype=torch.long), "labels": torch.tensor(i % 2)}
            for i in range(32)]
    args = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_train_batch_size=8,
                             report_to=[], save_strategy="no", disable_tqdm=True, max_steps=1)
    tr = Trainer(model=model, args=args, train_dataset=data)
    budget = int(ns.trainer_mib * MiB)
    module = optimize_trainer(tr, budget, allow=ALL, time_limit=ns.time_limit)
    tr.train()  # plans the step, makes AdamW's state
    before = model.classifier.weight.detach().clone()
    tr.args.max_steps = 3
    measured = _peak(tr.train, [model, tr.optimizer])
    return {"path": "trainer", "model": "BertForSequenceClassification (2 layers, d 64) under "
            "the HF Trainer (its AdamW), batch 8x64", "eager": None, "budget": budget,
            "predicted": module.plan.predicted_peak, "measured": measured,
            "levers": _levers(module.plan),
            "trained": not torch.equal(model.classifier.weight, before), "detail": ""}


def breaks(ns) -> list[dict]:
    from tests.api.test_graph_breaks import BreakBetweenStages

    torch.manual_seed(0)
    model = fxmem.sparsify(BreakBetweenStages(), ns.breaks_density)
    x = torch.randn(2048, 256, generator=torch.Generator().manual_seed(1))

    def step_of(call):
        def step():
            call(x).backward()
        return step

    step_of(model)()
    model.zero_grad(set_to_none=True)
    eager = _peak(step_of(model), [model, x])
    model.zero_grad(set_to_none=True)
    budget = int(ns.breaks_fraction * eager)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxmem", options={
        "budget": budget, "allow": ("recompute", "microbatch", "precision"),
        "time_limit": ns.time_limit})
    step_of(compiled)()  # plans and compiles
    params = [p for p in model.parameters() if p.requires_grad]
    moved = all(p.grad is not None and bool(torch.isfinite(p.grad).all())
                and bool(p.grad.any()) for p in params)
    model.zero_grad(set_to_none=True)
    measured = _peak(step_of(compiled), [model, x])
    model.zero_grad(set_to_none=True)
    from fxmem.api.backend import LAST_PLANS

    plans = list(LAST_PLANS.plans)[-3:]
    torch._dynamo.reset()
    rows = [{"path": "breaks (backend)", "model": f"3 graphs split by 2 graph breaks, "
             f"sparsified by the user at density {ns.breaks_density}, x 2048x256",
             "eager": eager, "budget": budget, "predicted": None, "measured": measured,
             "levers": "; ".join(_levers(p) for p in plans), "trained": moved,
             "detail": "trained: every parameter got a finite, non-zero gradient (no optimizer "
             "stepped)"}]
    try:
        fxmem.optimize(model, budget, allow=ALL, time_limit=ns.time_limit)(x)
        refused = "not refused"
    except fxmem.CaptureError as exc:
        refused = "CaptureError: " + " ".join(str(exc).split("\n")[-1].split()[:40])
    rows.append({"path": "breaks (fxmem.optimize)", "model": "the same model", "eager": eager,
                 "budget": budget, "predicted": None, "measured": None, "levers": "",
                 "trained": False, "detail": refused})
    return rows


def write(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "user_paths.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    mib = lambda v: "" if v is None else f"{v / MiB:.2f}"  # noqa: E731
    md = ["# Every lever allowed, the way a user's code uses fxmem (bench/user_paths.py)", "",
          f"Command: `{meta['command']}`; {meta['date']}; torch {meta['torch']}; "
          f"{meta['threads']} torch thread(s); {meta['wall_s']:.0f} s.", "",
          "| path | model | eager MiB | budget MiB | predicted MiB | measured MiB | within | "
          "levers used | trained | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        within = "" if r["measured"] is None else ("yes" if r["measured"] <= r["budget"]
                                                  else "**NO**")
        md.append(f"| {r['path']} | {r['model']} | {mib(r['eager'])} | {mib(r['budget'])} | "
                  f"{mib(r['predicted'])} | {mib(r['measured'])} | {within} | {r['levers']} | "
                  f"{'yes' if r['trained'] else 'no'} | {r['detail']} |")
    (RESULTS / "user_paths.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", default="loop,trainer,breaks")
    p.add_argument("--loop-fraction", type=float, default=0.35)
    p.add_argument("--trainer-mib", type=float, default=1.3)
    p.add_argument("--breaks-fraction", type=float, default=0.6)
    p.add_argument("--breaks-density", type=float, default=0.5)
    p.add_argument("--time-limit", type=float, default=3.0)
    ns = p.parse_args(argv)
    import tempfile

    t0 = time.perf_counter()
    rows: list[dict] = []
    paths = ns.paths.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "loop" in paths:
            rows.append(loop(ns))
        if "trainer" in paths:
            rows.append(trainer(ns, Path(tmp)))
        if "breaks" in paths:
            rows += breaks(ns)
    meta = {"command": "python " + " ".join(["bench/user_paths.py",
                                             *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "wall_s": time.perf_counter() - t0}
    write(rows, meta)
    for r in rows:
        print(r["path"], mib_str(r), r["levers"], r["detail"], flush=True)
    return 0 if all(r["measured"] is None or r["measured"] <= r["budget"] for r in rows) else 1


def mib_str(r: dict) -> str:
    return " / ".join("-" if r[k] is None else f"{r[k] / MiB:.2f}"
                      for k in ("budget", "predicted", "measured"))


if __name__ == "__main__":
    sys.exit(main())
