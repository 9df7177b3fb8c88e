"""Accuracy of the lossy levers (bf16 compute, sparse weights) on real data, against eager fp32.

Each model is trained once per mode from the same seed: ``torch.manual_seed(seed)`` before the
model is built (every mode starts from the same weights, and dropout draws from the same global
stream), the batches drawn from a ``torch.Generator`` of their own seeded with ``seed + 1`` (every
mode sees the same batches in the same order), the same optimizer, learning-rate schedule and
number of steps. The loop is the plain one: forward (the model returns its loss), backward,
``optimizer.step()``, ``scheduler.step()``, ``optimizer.zero_grad()``.

Modes:

- ``fp32``: eager PyTorch, the baseline.
- ``bf16``: ``fxmem.optimize(model, "64GiB", optimizer=opt, allow=("recompute", "microbatch",
  "precision"), precision="bf16", lowering=...)``: matrix products, convolutions and attention in
  bf16 (autocast's casts captured in the graph), fp32 master weights, fp32 loss. The generous
  budget leaves recompute and microbatching idle, so the difference to fp32 is the precision
  lever's alone. Lowering: ``--bf16-lowering`` (default ``per-model``: Inductor for ``wrn``,
  eager FX for ``lm``, whose Inductor-compiled bf16 step ran ~8x slower than eager fp32 on this
  CPU, see the results file).
- ``sparse80``/``sparse90``: ``fxmem.sparsify(model, density=0.2/0.1, optimizer=opt)`` (ERK
  densities, first and last weight layers dense, magnitude-initialised masks) with dynamic
  sparsity: ``model.sparsity.attach(opt, method="rigl", every=E, fraction=0.3,
  until=0.75 * steps)`` and ``model.sparsity.step(x, y)`` after each optimizer step (the way
  fxmem.levers.sparse.dynamic documents). ``E = max(1, steps // 10)``: RigL's own 100 is for
  tens of thousands of steps; this gives about 7 prune/regrow updates, all in the first 75% of
  training.
- ``sparse80-static``/``sparse90-static``: the same with ``method="static"`` (the mask never moves).

Models:

- ``lm``: ``fxmem.examples.GPT``, byte-level (vocab 256), 6 layers, d_model 256, 4 heads, dropout
  0.1, tied embeddings, on :func:`bench.real_data.stdlib_corpus` (the stdlib's ``.py`` sources),
  batch 16 x 128 bytes; AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.01 on every parameter --
  the same for sparse values vectors), linear warm-up over 5% of the steps then cosine to 10% of
  the peak. Metric: the validation loss (nats/byte), the mean over 16 fixed validation batches
  (16 x 128 bytes, seed 1234), evaluated eagerly in fp32 in ``eval()`` mode for every mode (the
  bf16 mode also under bf16 autocast).
- ``wrn``: WideResNet-28-2 on :func:`bench.real_data.digits_32x32` (1437 train / 360 test
  images), batch 128 (full batches only: 11 per epoch), SGD momentum 0.9, Nesterov, weight decay
  5e-4, lr 0.05, linear warm-up over 5% of the steps then cosine to 0. Metric: test accuracy (%).

Writes ``bench/results/<out>.md`` and ``<out>.json`` (default ``accuracy``; ``--quick``:
``accuracy_quick``), rewritten after every run so a crash keeps what finished. A mode that
raises is recorded with its error and the others still run.

    python bench/accuracy.py                               # the default run: ~17 min by
                                                           # idle 2-core step times; 86 min
                                                           # under a load average of 4-7
    python bench/accuracy.py --quick                       # a smoke run (a few steps each)
    python bench/accuracy.py --models wrn --modes fp32,bf16 --steps 50
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from copy import deepcopy
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxmem  # noqa: E402
from bench.environment import cpu_name  # noqa: E402
from bench.real_data import digits_32x32, stdlib_corpus  # noqa: E402
from fxmem.examples import GPT, GPTConfig, WideResNet, wide_resnet_28_2  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is installed in the project's environment
    tqdm = None

RESULTS = ROOT / "bench" / "results"
MODES = ("fp32", "bf16", "bf16-8bit", "sparse80", "sparse90", "sparse80-static",
         "sparse90-static")
PRECISION_MODES = ("bf16", "bf16-8bit")
EIGHT_BIT_MARGIN = 1.02  # the bf16-8bit mode's budget: this times the floor with 8 bits offered
MODELS = ("lm", "wrn")
DENSITY = {"sparse80": 0.2, "sparse90": 0.1}
PRECISION_ALLOW = ("recompute", "microbatch", "precision")
# the bf16-8bit mode's levers: without microbatching, whose smaller microbatches lower the floor
# below where saved values hold it (then no value is stored in 8 bits and the mode would measure
# bf16 compute again, as a run with PRECISION_ALLOW did: 0 values in 8 bits at 1.02x its floor)
EIGHT_BIT_ALLOW = ("recompute", "precision")
BF16_LOWERING = {"lm": "eager", "wrn": "inductor"}  # --bf16-lowering per-model
# the thresholds for the bf16 mode
MAX_ACC_DROP_POINTS = 0.5
MAX_LOSS_REL_PCT = 2.0


# ------------------------------------------------------------------------------ models


@dataclasses.dataclass
class Task:
    """What one model needs: build it, its optimizer and schedule, its batches, its metric."""

    name: str
    steps: int
    batch: int
    build: Callable[[], torch.nn.Module]
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    lr_lambda: Callable[[int], float]
    batches: Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    evaluate: Callable[[torch.nn.Module], dict]
    metric: str  # the key of evaluate's dict compared across modes
    higher_is_better: bool
    description: str


def _warmup_cosine(steps: int, warmup_frac: float = 0.05, floor: float = 0.0):
    warmup = max(1, int(warmup_frac * steps))

    def lr_lambda(step: int) -> float:  # called with the number of steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lr_lambda


def lm_task(steps: int, quick: bool, *, batch: int | None = None, seq: int | None = None,
            n_layer: int = 6, n_head: int = 4, d_model: int | None = None,
            vocab_size: int = 256, dropout: float = 0.1, n_val: int | None = None) -> Task:
    """The byte-level GPT on the stdlib corpus. The keywords change the model and the batch
    (None: this bench's own sizes, smaller with ``quick``); a vocabulary over 256 holds ids the
    bytes never use (bench/reproduction.py trains the bench ``gpt_decoder``, vocabulary 8192)."""
    corpus = stdlib_corpus()
    batch = batch or (4 if quick else 16)
    seq = seq or (64 if quick else 128)
    n_val = n_val or (2 if quick else 16)
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                    d_model=d_model or (128 if quick else 256), max_seq_len=seq, dropout=dropout)
    val = corpus.fixed_batches("val", n=n_val, batch=batch, seq=seq, seed=1234)

    def batches(g: torch.Generator):
        while True:
            yield corpus.sample("train", batch, seq, generator=g)

    def evaluate(model: torch.nn.Module) -> dict:
        def mean_loss(autocast: bool) -> float:
            total = 0.0
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                for x, y in val:
                    total += float(model(x, y).float())
            return total / len(val)

        return {"val_loss": mean_loss(False), "val_loss_bf16_autocast": mean_loss(True)}

    return Task(
        name="lm", steps=steps, batch=batch, build=lambda: GPT(cfg),
        make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                                   weight_decay=0.01),
        lr_lambda=_warmup_cosine(steps, floor=0.1), batches=batches, evaluate=evaluate,
        metric="val_loss", higher_is_better=False,
        description=(f"GPT n_layer={cfg.n_layer} d_model={cfg.d_model} n_head={cfg.n_head} "
                     f"dropout={cfg.dropout}, byte-level (vocab {cfg.vocab_size}"
                     f"{'' if cfg.vocab_size == 256 else ', bytes use ids 0-255'}) on the "
                     f"stdlib corpus "
                     f"({corpus.train.numel()} train / {corpus.val.numel()} validation bytes, "
                     f"{len(corpus.train_files)} / {len(corpus.val_files)} files, sha256 "
                     f"{corpus.sha256[:12]}), batch {batch} x {seq}, AdamW lr 1e-3 "
                     f"(0.9, 0.95) wd 0.01, 5% warm-up + cosine to 10%; validation: {n_val} "
                     f"fixed batches of {batch} x {seq}"),
    )


def wrn_task(steps: int, quick: bool, *, batch: int | None = None, depth: int = 28,
             widen_factor: int = 2) -> Task:
    """WRN-``depth``-``widen_factor`` (default 28-2) on the digits at 3x32x32."""
    data = digits_32x32(seed=0)
    batch = batch or (16 if quick else 128)

    def build() -> torch.nn.Module:
        if (depth, widen_factor) == (28, 2):
            return wide_resnet_28_2(num_classes=10, in_channels=3)
        return WideResNet(depth=depth, widen_factor=widen_factor, num_classes=10, in_channels=3)

    def batches(g: torch.Generator):
        while True:  # epoch after epoch, each in an order drawn from g
            yield from data.train_batches(batch, generator=g)

    def evaluate(model: torch.nn.Module) -> dict:
        correct, loss, n = 0, 0.0, 0
        with torch.no_grad():
            for x, y in data.test_batches(256):
                logits = model(x)
                loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
                n += y.numel()
        return {"test_acc": 100.0 * correct / n, "test_loss": loss / n}

    per_epoch = data.x_train.shape[0] // batch
    return Task(
        name="wrn", steps=steps, batch=batch,
        build=build,
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,
                                                 nesterov=True, weight_decay=5e-4),
        lr_lambda=_warmup_cosine(steps, floor=0.0), batches=batches, evaluate=evaluate,
        metric="test_acc", higher_is_better=True,
        description=(f"WideResNet-{depth}-{widen_factor} on sklearn digits at 3x32x32 "
                     f"({data.x_train.shape[0]} train / {data.x_test.shape[0]} test, stratified, "
                     f"seed 0), batch {batch} ({per_epoch} full batches per epoch, "
                     f"{steps / per_epoch:.1f} epochs), SGD lr 0.05 momentum 0.9 nesterov wd "
                     f"5e-4, 5% warm-up + cosine to 0"),
    )


DEFAULT_STEPS = {"lm": 300, "wrn": 55}  # wrn: 5 epochs of 11 batches (66 steps: 96.9% in fp32)
QUICK_STEPS = {"lm": 4, "wrn": 3}
TASKS = {"lm": lm_task, "wrn": wrn_task}


# ------------------------------------------------------------------------------ one run


def sparse_every(steps: int) -> int:
    return max(1, steps // 10)


@dataclasses.dataclass
class Prepared:
    """What a mode trains with: ``step_fn(x, y)`` returns the loss (the model itself, or an
    ``fxmem.optimize`` module over it); ``after_step(x, y)`` runs after each optimizer step
    (dynamic sparsity's prune and regrow); ``eval_model`` is evaluated after training (default:
    the model)."""

    step_fn: Callable
    after_step: Callable | None = None
    eval_model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None  # the loop steps it instead of the one built


def train(task: Task, seed: int, prepare: Callable[[torch.nn.Module, torch.optim.Optimizer],
                                                    Prepared] | None = None, *,
          label: str = "fp32", measure_step: int | None = None) -> dict:
    """Train ``task``'s model for ``task.steps`` steps and evaluate it: the loop every mode shares.

    ``torch.manual_seed(seed)``, then the model and its optimizer are built; ``prepare(model,
    opt)`` makes the mode's :class:`Prepared` (None: eager PyTorch); the batches come from a
    generator seeded with ``seed + 1``. Each step: ``loss = step_fn(x, y)``, ``backward``,
    ``opt.step()``, ``scheduler.step()``, ``opt.zero_grad(set_to_none=True)``, then
    ``after_step`` (``opt``: the prepared optimizer when it names one). ``measure_step``: that step (0-based) runs under ``fxmem.measure_memory``
    (the bytes the model, the batch and the optimizer hold at its start plus the allocator's
    events; the loss held to the end of the iteration): ``measured_peak`` in the row.
    Returns the row: the metric, losses, times, ``prepare_s`` (the mode's set-up), and
    ``_model``, ``_step_fn`` and ``_optimizer`` (not for JSON)."""
    row: dict = {"model": task.name, "mode": label, "steps": task.steps}
    t_start = time.perf_counter()
    torch.manual_seed(seed)  # the same initial weights and dropout stream in every mode
    model = task.build().train()
    opt = task.make_optimizer(model)
    row["dense_params"] = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    prepared = prepare(model, opt) if prepare is not None else Prepared(model)
    row["prepare_s"] = time.perf_counter() - t0
    opt = prepared.optimizer or opt
    row["params"] = sum(p.numel() for p in model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, task.lr_lambda)
    gen = torch.Generator().manual_seed(seed + 1)  # the same batches in every mode
    batches = task.batches(gen)
    losses, times = [], []
    bar = (tqdm(range(task.steps), desc=f"{task.name}/{label}", leave=True, mininterval=5.0,
                file=sys.stdout) if tqdm is not None else range(task.steps))

    def iteration(x, y) -> torch.Tensor:
        loss = prepared.step_fn(x, y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss  # held to the end of the iteration, as a user's loop holds it

    for i in bar:
        x, y = next(batches)
        t0 = time.perf_counter()
        if i == measure_step:
            gc.collect()
            mem = fxmem.measure_memory(lambda: iteration(x, y), device="cpu",
                                       baseline=[model, [x, y], opt])
            loss = mem.result
            row["measured_peak"] = mem.peak
        else:
            loss = iteration(x, y)
        if prepared.after_step is not None:
            prepared.after_step(x, y)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        row["loss_dtype"] = str(loss.dtype)
        del loss
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss {losses[-1]} at step {i}")
        if tqdm is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    if tqdm is not None:
        bar.close()
    train_s = time.perf_counter() - t_start
    model.eval()
    t0 = time.perf_counter()
    row.update(task.evaluate(prepared.eval_model if prepared.eval_model is not None else model))
    row["eval_s"] = time.perf_counter() - t0
    tail = max(1, min(20, len(losses) // 5))
    row.update(status="ok", first_step_s=times[0],
               median_step_s=statistics.median(times[1:]) if len(times) > 1 else times[0],
               train_loss_first=losses[0], train_loss_last=statistics.mean(losses[-tail:]),
               train_losses=losses, train_s=train_s, wall_s=time.perf_counter() - t_start,
               _model=model, _step_fn=prepared.step_fn, _optimizer=opt)
    return row


def run_one(task: Task, mode: str, seed: int, args) -> dict:
    """Train ``task``'s model in ``mode`` for ``task.steps`` steps; evaluate it."""
    extra: dict = {}

    def prepare(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Prepared:
        if mode in ("sparse80", "sparse90", "sparse80-static", "sparse90-static"):
            density = DENSITY[mode.split("-")[0]]
            fxmem.sparsify(model, density=density, optimizer=opt)
            dynamic = not mode.endswith("-static")
            until = int(0.75 * task.steps)
            every = sparse_every(task.steps)
            model.sparsity.attach(opt, method="rigl" if dynamic else "static", every=every,
                                  fraction=0.3, until=until)
            extra["sparsity"] = {"density": density, "method": model.sparsity.method,
                                 "every": every, "fraction": 0.3, "until": until,
                                 "sparse_layers": len(model.sparsity.layers)}
            # counts the step; prunes and regrows every `every`
            return Prepared(model, after_step=model.sparsity.step if dynamic else None)
        if mode in PRECISION_MODES:
            lowering = (BF16_LOWERING[task.name] if args.bf16_lowering == "per-model"
                        else args.bf16_lowering)
            extra["lowering"] = lowering
            budget, bits = args.budget, 16
            if mode == "bf16-8bit":
                bits = 8
                floor = eight_bit_floor(task, model, lowering, seed)
                budget = int(EIGHT_BIT_MARGIN * floor)
                extra.update(floor_8bit=floor, budget=budget)
            allow = EIGHT_BIT_ALLOW if mode == "bf16-8bit" else PRECISION_ALLOW
            step_fn = fxmem.optimize(model, budget, optimizer=opt, allow=allow,
                                     precision="bf16", lowering=lowering, stored_bits=bits)
            # an OptimizedModule in eval is the model
            return Prepared(step_fn, eval_model=step_fn)
        return Prepared(model)

    row = train(task, seed, prepare, label=mode)
    model, step_fn = row.pop("_model"), row.pop("_step_fn")
    row.pop("_optimizer")
    if mode not in PRECISION_MODES:
        row.pop("loss_dtype")
    row.pop("prepare_s")
    row.pop("train_losses")
    row.update(extra)
    if mode in PRECISION_MODES:
        report = step_fn.plan.report()
        row["plan_levers"] = next((ln.strip() for ln in report.splitlines()
                                   if ln.startswith("levers used")), None)
        row["plan_head"] = report.splitlines()[0]
        row["stored_low"] = next((ln.strip() for ln in report.splitlines()
                                  if ln.strip().startswith("stored-low:")), None)
        stored = next((r.details for r in step_fn.plan.provenance if r.name == "stored-low"),
                      None)
        row["values_8bit"] = len(stored.values_8bit) if stored is not None else 0
    if mode.startswith("sparse"):
        report = model.sparsity.report()
        row["sparsity"].update(measured_density=report.density, updates=len(model.sparsity.history),
                               moved=sum(r.moved for r in model.sparsity.history))
    return row


# ------------------------------------------------------------------------------ report


def baseline_rows(stem: str, tasks: dict[str, Task]) -> list[dict]:
    """The fp32 rows of ``bench/results/<stem>.json`` for these tasks (same model, same steps),
    marked as taken from there: the same seeds and batches, so they are the baseline of this
    run's modes."""
    old = json.loads((RESULTS / f"{stem}.json").read_text())
    rows = []
    for name, task in tasks.items():
        row = next((r for r in old["runs"] if r.get("model") == name and r.get("mode") == "fp32"
                    and r.get("status") == "ok" and r.get("steps") == task.steps), None)
        if row is None:
            raise SystemExit(f"--baseline {stem}: no fp32 run of {name} at {task.steps} steps")
        rows.append(dict(row, from_baseline=f"{stem}.json ({old.get('date')})"))
    return rows


def eight_bit_floor(task: Task, model: torch.nn.Module, lowering: str, seed: int) -> int:
    """The smallest budget the bf16-8bit mode's levers reach on the first training batch (the
    BudgetError of a 1-byte budget), planned on a copy: the model, its optimizer and the RNG are
    left as they were."""
    copy = deepcopy(model)
    x, y = next(task.batches(torch.Generator().manual_seed(seed + 1)))  # train's first batch
    rng = torch.get_rng_state()
    try:
        fxmem.optimize(copy, 1, optimizer=task.make_optimizer(copy), allow=EIGHT_BIT_ALLOW,
                       precision="bf16", lowering=lowering, stored_bits=8)(x, y)
    except fxmem.BudgetError as exc:
        return int(exc.floor)
    finally:
        torch.set_rng_state(rng)
    raise RuntimeError("a 1-byte budget was met")


def _diff(task_metric: str, higher_is_better: bool, value: float, base: float) -> dict:
    if task_metric == "val_loss":
        return {"diff_pct": 100.0 * (value - base) / base}
    return {"diff_points": value - base}


def _verdicts(rows: list[dict]) -> list[str]:
    lines = []
    by = {(r["model"], r["mode"]): r for r in rows}
    for mode in PRECISION_MODES:
        lm_fp, lm_bf = by.get(("lm", "fp32")), by.get(("lm", mode))
        if lm_fp and lm_bf and lm_fp.get("status") == lm_bf.get("status") == "ok":
            rel = 100.0 * abs(lm_bf["val_loss"] - lm_fp["val_loss"]) / lm_fp["val_loss"]
            lines.append(f"- lm: {mode} validation loss within {MAX_LOSS_REL_PCT}% of fp32's: "
                         f"**{'holds' if rel <= MAX_LOSS_REL_PCT else 'does not hold'}** "
                         f"(|{lm_bf['val_loss']:.4f} - {lm_fp['val_loss']:.4f}| / "
                         f"{lm_fp['val_loss']:.4f} = {rel:.2f}%)")
        elif lm_bf:
            lines.append(f"- lm: {mode} threshold not checked (a run failed or is missing)")
        w_fp, w_bf = by.get(("wrn", "fp32")), by.get(("wrn", mode))
        if w_fp and w_bf and w_fp.get("status") == w_bf.get("status") == "ok":
            drop = w_fp["test_acc"] - w_bf["test_acc"]
            lines.append(f"- wrn: {mode} test accuracy within {MAX_ACC_DROP_POINTS} points of "
                         f"fp32's: **{'holds' if drop <= MAX_ACC_DROP_POINTS else 'does not hold'}"
                         f"** ({w_bf['test_acc']:.2f}% vs {w_fp['test_acc']:.2f}%, "
                         f"{-drop:+.2f} points)")
        elif w_bf:
            lines.append(f"- wrn: {mode} threshold not checked (a run failed or is missing)")
    for r in rows:
        if r.get("mode") == "bf16-8bit" and r.get("status") == "ok":
            lines.append(f"- {r['model']}/bf16-8bit planned at {r['budget'] / 2**20:.2f} MiB "
                         f"({EIGHT_BIT_MARGIN}x its floor with 8 bits offered, "
                         f"{r['floor_8bit'] / 2**20:.2f} MiB): {r.get('stored_low')}")
            if not r.get("values_8bit"):
                lines.append(f"- **{r['model']}/bf16-8bit stored no value in 8 bits: this run "
                             "does not measure 8-bit storage**")
    return lines


def write_results(meta: dict, tasks: dict[str, Task], rows: list[dict], out: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for r in rows:  # differences to the fp32 run of the same model
        base = next((b for b in rows if b["model"] == r["model"] and b["mode"] == "fp32"
                     and b.get("status") == "ok"), None)
        task = tasks[r["model"]]
        if base is not None and r.get("status") == "ok":
            r.update(_diff(task.metric, task.higher_is_better, r[task.metric], base[task.metric]))
    (RESULTS / f"{out}.json").write_text(json.dumps({**meta, "runs": rows}, indent=2) + "\n")

    md = [f"# Accuracy of the lossy levers on real data (bench/accuracy.py)", ""]
    md += [f"- command: `{meta['command']}`",
           f"- date: {meta['date']}; torch {meta['torch']}; Python {meta['python']}; "
           f"CPU: {meta['cpu']} ({meta['threads']} torch threads, machine shared with other "
           f"processes: times are indicative)",
           f"- seeds: model/dropout `torch.manual_seed({meta['seed']})`, batches "
           f"`Generator().manual_seed({meta['seed'] + 1})`, LM validation batches seed 1234, "
           f"digits split seed 0",
           f"- bf16 mode: `fxmem.optimize(model, {meta['budget']!r}, optimizer=opt, "
           f"allow={PRECISION_ALLOW}, precision='bf16', lowering=...)`; lowering per model: "
           f"{meta['bf16_lowering']}; bf16-8bit mode: the same with `stored_bits=8` and "
           f"`allow={EIGHT_BIT_ALLOW}` at {EIGHT_BIT_MARGIN}x the floor those levers reach (so "
           f"that saved values are stored in 8 bits where the budget needs it)",
           *([f"- fp32 rows: taken from `bench/results/{meta['baseline']}.json` (same seeds, "
              f"batches and steps), not trained in this run"] if meta.get("baseline") else []),
           f"- sparse modes: `fxmem.sparsify(model, density, optimizer=opt)` (ERK, first/last "
           f"dense, magnitude init) then `model.sparsity.attach(opt, method='rigl' | 'static', "
           f"every=max(1, steps // 10), fraction=0.3, until=int(0.75 * steps))`; "
           f"`model.sparsity.step(x, y)` after each optimizer step (dynamic modes only)",
           f"- total wall time: {meta.get('total_wall_s', 0.0) / 60:.1f} min", ""]
    for name, task in tasks.items():
        md += [f"## {name}", "", task.description, "", f"{task.steps} steps per mode.", ""]
        mrows = [r for r in rows if r["model"] == name]
        if name == "lm":
            md += ["| mode | val loss (fp32 eval) | vs fp32 | val loss (bf16 autocast eval) | "
                   "final train loss | params | wall | median step | first step |",
                   "|---|---|---|---|---|---|---|---|---|"]
        else:
            md += ["| mode | test acc | vs fp32 | test loss | final train loss | params | wall | "
                   "median step | first step |",
                   "|---|---|---|---|---|---|---|---|---|"]
        for r in mrows:
            if r.get("status") != "ok":
                md.append(f"| {r['mode']} | **failed**: {r.get('error', '?')} | | | | | "
                          f"{r.get('wall_s', 0):.0f} s | | |")
                continue
            params = f"{r['params'] / 1e6:.2f}M"
            timing = (f"{r['wall_s']:.0f} s | {1000 * r['median_step_s']:.0f} ms | "
                      f"{r['first_step_s']:.1f} s")
            if name == "lm":
                diff = f"{r['diff_pct']:+.2f}%" if "diff_pct" in r else ""
                md.append(f"| {r['mode']} | {r['val_loss']:.4f} | {diff} | "
                          f"{r['val_loss_bf16_autocast']:.4f} | {r['train_loss_last']:.4f} | "
                          f"{params} | {timing} |")
            else:
                diff = f"{r['diff_points']:+.2f} pts" if "diff_points" in r else ""
                md.append(f"| {r['mode']} | {r['test_acc']:.2f}% | {diff} | "
                          f"{r['test_loss']:.4f} | {r['train_loss_last']:.4f} | {params} | "
                          f"{timing} |")
        sparse_rows = [r for r in mrows if r.get("status") == "ok" and "sparsity" in r]
        if sparse_rows:
            md += ["", "| sparse mode | method | measured density (sparse layers) | "
                       "sparse layers | updates | weights moved |", "|---|---|---|---|---|---|"]
            for r in sparse_rows:
                s = r["sparsity"]
                md.append(f"| {r['mode']} | {s['method']} (every {s['every']}, until "
                          f"{s['until']}) | {s['measured_density']:.4f} | {s['sparse_layers']} "
                          f"| {s['updates']} | {s['moved']} |")
        md.append("")
    md += ["## The issue's thresholds for bf16", ""] + (_verdicts(rows) or ["- not run"]) + [""]
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        md += ["## Failures", ""]
        for r in failed:
            md += [f"### {r['model']}/{r['mode']}", "", "```", r.get("traceback", "").strip(),
                   "```", ""]
    if meta.get("notes"):
        md += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    (RESULTS / f"{out}.md").write_text("\n".join(md))


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps for every model (default {DEFAULT_STEPS})")
    p.add_argument("--lm-steps", type=int, default=None)
    p.add_argument("--wrn-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", default="64GiB", help="the bf16 mode's budget (generous)")
    p.add_argument("--bf16-lowering", default="per-model",
                   choices=("per-model", "inductor", "eager"))
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps, small LM")
    p.add_argument("--out", default=None, help="results file stem (default accuracy, "
                                                "accuracy_quick with --quick)")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section")
    p.add_argument("--baseline", default=None, metavar="STEM",
                   help="take the fp32 rows (same models and steps) from "
                        "bench/results/STEM.json instead of training fp32 again")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {MODELS}")
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {MODES}")
    out = args.out or ("accuracy_quick" if args.quick else "accuracy")
    steps = dict(QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if args.steps is not None:
        steps = {m: args.steps for m in steps}
    if args.lm_steps is not None:
        steps["lm"] = args.lm_steps
    if args.wrn_steps is not None:
        steps["wrn"] = args.wrn_steps
    tasks = {m: TASKS[m](steps[m], args.quick) for m in models}
    lowering = ({m: BF16_LOWERING[m] for m in models} if args.bf16_lowering == "per-model"
                else {m: args.bf16_lowering for m in models})
    meta = {"command": "python " + " ".join(["bench/accuracy.py", *sys.argv[1:]]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "threads": torch.get_num_threads(), "seed": args.seed, "budget": args.budget,
            "steps": steps, "bf16_lowering": lowering, "notes": args.note,
            "thresholds": {"wrn_acc_points": MAX_ACC_DROP_POINTS,
                           "lm_val_loss_rel_pct": MAX_LOSS_REL_PCT}}
    rows: list[dict] = []
    if args.baseline:
        rows += baseline_rows(args.baseline, tasks)
        modes = [m for m in modes if m != "fp32"]
        meta["baseline"] = args.baseline
    t0 = time.perf_counter()
    for name, task in tasks.items():
        print(f"== {name}: {task.description}", flush=True)
        for mode in modes:
            try:
                row = run_one(task, mode, args.seed, args)
            except Exception as exc:  # noqa: BLE001 - recorded, the other modes still run
                first = str(exc).splitlines()[0][:300] if str(exc) else ""
                row = {"model": name, "mode": mode, "steps": task.steps, "status": "failed",
                       "error": f"{type(exc).__name__}: {first}",
                       "traceback": traceback.format_exc()[-6000:]}
                print(f"!! {name}/{mode} failed: {row['error']}", flush=True)
            else:
                shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                         if k in (task.metric, "wall_s", "median_step_s", "first_step_s")}
                print(f"-- {name}/{mode}: {shown}", flush=True)
            rows.append(row)
            meta["total_wall_s"] = time.perf_counter() - t0
            write_results(meta, tasks, rows, out)
    print(f"wrote {RESULTS / (out + '.md')} ({meta['total_wall_s'] / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
