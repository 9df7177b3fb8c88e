"""Sparse weights on the bench GPT: what they save (measured), what they cost (timed), per density.

For the dense model and for ``fxmem.sparsify(model, density, kernel="auto")`` at each density
(ERK densities, first and last weight layers dense -- on this GPT the embedding and its tied head,
so every block's linear layer is sparsified):

- **bytes of parameters + gradients + Adam state**, measured with the allocator: the bytes still
  allocated after building the model, an Adam step and with the gradients kept (``end - start``
  of :func:`fxmem.measure_memory`), for the whole model; the sparsified layers' share is the dense
  layers' bytes minus the measured saving (the rest of the model is the same in both). The
  report's count of the same bytes (:class:`fxmem.levers.sparse.SparsityReport`) is beside it;
- **the step's peak** (forward, backward, Adam step), measured and as ``fxmem.estimate`` predicts;
- **step time**, sparse over dense: eager training steps (forward, backward, Adam step,
  ``zero_grad``) of each model in turn, round-robin, the median of each; the ratio is measured in
  one run on this machine;
- **kernel per layer**, measured: each sparsified layer's forward+backward on the input shape it
  sees, with a dense ``nn.Linear`` of that shape, with the sparse layer's transient dense weight,
  and with the CSR product (``torch.sparse``); the faster of the two sparse kernels is the one
  the layer runs.

    python bench/sparse.py                      # writes bench/results/sparse.md and sparse.json
    python bench/sparse.py --n-layer 2 --steps 5   # quicker
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxmem  # noqa: E402
from bench.environment import cpu_name  # noqa: E402
from bench.workloads import gpt_decoder  # noqa: E402
from fxmem.levers.sparse import sparsify  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MiB = 2**20


def _workload(args):
    return gpt_decoder(batch=args.batch, seq=args.seq, n_layer=args.n_layer,
                       d_model=args.d_model, n_head=args.n_head, vocab_size=args.vocab)


def _build(args, density):
    w = _workload(args)
    model, inputs = w["model"], w["args"]
    if density is not None:
        sparsify(model, density, kernel="auto", example_inputs=inputs)
    return model, inputs


def resident_bytes(args, density) -> tuple[int, nn.Module, torch.optim.Optimizer, tuple]:
    """Bytes the allocator holds after building the model and one Adam step, gradients kept."""
    held = {}

    def run():
        model, inputs = _build(args, density)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(*inputs).backward()
        opt.step()
        held.update(model=model, opt=opt, inputs=inputs)

    gc.collect()
    m = fxmem.measure_memory(run, device="cpu", baseline=0)
    return m.end - m.start, held["model"], held["opt"], held["inputs"]


def step_peak(model, opt, inputs) -> tuple[int, int]:
    """(measured, predicted) peak of one eager step with Adam."""
    opt.zero_grad()

    def step():
        model(*inputs).backward()
        opt.step()
        opt.zero_grad()

    gc.collect()
    measured = fxmem.measure_memory(step, device="cpu", baseline=[model, opt, *inputs]).peak
    predicted = fxmem.estimate(model, *inputs, optimizer=opt).peak
    return measured, predicted


def step_times(configs: dict, steps: int) -> dict[str, float]:
    """Median seconds of an eager training step of each model, timed round-robin."""
    times = {name: [] for name in configs}
    for name, (model, opt, inputs) in configs.items():  # warm-up
        model(*inputs).backward()
        opt.step()
        opt.zero_grad()
    for _ in range(steps):
        for name, (model, opt, inputs) in configs.items():
            t0 = time.perf_counter()
            model(*inputs).backward()
            opt.step()
            opt.zero_grad()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _interleaved(fns: dict, repeats: int, min_block_s: float = 0.01) -> dict[str, float]:
    """Seconds per call of each function, timed round-robin: the fastest of ``repeats`` blocks."""
    calls, best = {}, {k: float("inf") for k in fns}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        calls[k] = max(1, int(min_block_s / max(time.perf_counter() - t0, 1e-6)))
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / calls[k])
    return best


def _fwd_bwd(module, x):
    params = [p for p in module.parameters() if p.requires_grad]

    def once():
        out = module(x)
        torch.autograd.grad(out, [x, *params], torch.ones_like(out))

    return once


def _compare_kernels(layer, input_shape, repeats) -> dict[str, float]:
    """A dense nn.Linear of the layer's shape, the layer's transient dense weight and its CSR
    product, forward + backward, timed in turn."""
    x = torch.randn(input_shape, requires_grad=True)
    dense = layer.to_dense_module()
    transient, csr = copy.deepcopy(layer), copy.deepcopy(layer)
    transient.set_kernel("dense")
    csr.set_kernel("csr")
    return _interleaved({"dense_linear": _fwd_bwd(dense, x), "transient": _fwd_bwd(transient, x),
                         "csr": _fwd_bwd(csr, x)}, repeats)


def kernel_rows(model, inputs, repeats) -> list[dict]:
    """Per sparsified layer shape (layers of one shape and density share a row): the times of a
    dense nn.Linear, the transient dense weight and CSR, timed in turn, and the kernel each
    layer runs (chosen by sparsify's own measurement)."""
    from fxmem.levers.sparse.sparsify import _input_shapes

    layers = model.sparsity.layers
    shapes = _input_shapes(model, layers, inputs, {})
    groups: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault((layer.weight_shape, shapes[name], layer.nnz), []).append(name)
    rows = []
    for (shape, input_shape, nnz), names in groups.items():
        layer = layers[names[0]]
        times = _compare_kernels(layer, input_shape, repeats)
        rows.append(dict(layers=names, shape=list(shape), input=list(input_shape),
                         density=layer.density, dense_linear_s=times["dense_linear"],
                         transient_s=times["transient"], csr_s=times["csr"],
                         chosen=[layers[n].kernel for n in names],
                         chooser_times=[layers[n].kernel_times for n in names]))
    return rows


def run(args) -> dict:
    torch.manual_seed(0)
    dense_bytes, dense_model, dense_opt, inputs = resident_bytes(args, None)
    results = {"config": vars(args), "cpu": cpu_name(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "densities": []}
    measured, predicted = step_peak(dense_model, dense_opt, inputs)
    results["dense"] = dict(resident_bytes=dense_bytes, peak_measured=measured,
                            peak_predicted=predicted)
    for density in args.densities:
        sparse_bytes, model, opt, sparse_inputs = resident_bytes(args, density)
        report = model.sparsity.report(opt)
        measured, predicted = step_peak(model, opt, sparse_inputs)
        times = step_times({"dense": (dense_model, dense_opt, inputs),
                            "sparse": (model, opt, sparse_inputs)}, args.steps)
        saved = dense_bytes - sparse_bytes
        row = dict(density=density, resident_bytes=sparse_bytes,
                   layers_dense_bytes=report.dense_bytes,
                   layers_sparse_bytes_measured=report.dense_bytes - saved,
                   layers_sparse_bytes_report=report.sparse_bytes,
                   peak_measured=measured, peak_predicted=predicted,
                   step_s_dense=times["dense"], step_s_sparse=times["sparse"],
                   time_ratio=times["sparse"] / times["dense"],
                   kernels=kernel_rows(model, sparse_inputs, args.kernel_repeats))
        results["densities"].append(row)
        print(f"density {density}: layers {row['layers_sparse_bytes_measured'] / MiB:.2f} MiB "
              f"of {report.dense_bytes / MiB:.2f} MiB dense, step time x{row['time_ratio']:.2f}",
              flush=True)
        del model, opt
        gc.collect()
    return results


def _mib(n: int) -> str:
    return f"{n / MiB:.2f}"


def markdown(res: dict) -> str:
    c = res["config"]
    d = res["dense"]
    lines = [
        "# Sparse weights on the bench GPT (bench/sparse.py)", "",
        f"GPT: {c['n_layer']} layers, d_model {c['d_model']}, {c['n_head']} heads, vocabulary "
        f"{c['vocab']}, batch {c['batch']} x {c['seq']} tokens, dropout 0.1, tied embedding; "
        "Adam. `fxmem.sparsify(model, density, kernel='auto')`: ERK densities over every "
        "block's linear layers (the embedding and its tied head stay dense).",
        f"CPU: {res['cpu']}, {res['threads']} threads, torch {res['torch']}. Step times are "
        f"medians of {c['steps']} eager steps (forward, backward, Adam step) of each model, "
        "round-robin in one run; the machine is shared, so ratios, not absolute times, mean "
        "something.", "",
        "## Bytes of parameters + gradients + Adam state, and the step", "",
        "Measured with the allocator (bytes held after building the model and an Adam step, "
        "gradients kept). *Layers*: the sparsified layers alone -- dense bytes minus the "
        "measured saving of the whole model; *report*: `model.sparsity.report(opt)`'s count.", "",
        "| density | whole model MiB | sparsified layers MiB (dense -> sparse) | "
        "layers sparse/dense | report MiB | step peak MiB measured / predicted | "
        "step time sparse/dense |",
        "|---|---|---|---|---|---|---|",
        f"| 1.0 (dense) | {_mib(d['resident_bytes'])} | | | | {_mib(d['peak_measured'])} / "
        f"{_mib(d['peak_predicted'])} | 1 |",
    ]
    for r in res["densities"]:
        lines.append(
            f"| {r['density']} | {_mib(r['resident_bytes'])} | {_mib(r['layers_dense_bytes'])} -> "
            f"{_mib(r['layers_sparse_bytes_measured'])} | "
            f"{r['layers_sparse_bytes_measured'] / r['layers_dense_bytes']:.3f} | "
            f"{_mib(r['layers_sparse_bytes_report'])} | {_mib(r['peak_measured'])} / "
            f"{_mib(r['peak_predicted'])} | {r['time_ratio']:.2f} |")
    lines += ["", "## Kernel per layer shape (forward + backward, ms)", "",
              "Each row: the sparsified layers of one shape and density. *dense nn.Linear*, "
              "*transient dense* (the sparse layer's dense weight made in the forward and again "
              "in the backward) and *CSR* (`torch.sparse` products) are timed in turn on the "
              "layer's input, the fastest of "
              f"{c['kernel_repeats']} blocks each. *Chosen*: the kernel each layer runs, from "
              "`sparsify(kernel='auto')`'s own measurement (dense:csr count).", "",
              "| density | layers | shape | input | layer density | dense nn.Linear | transient "
              "dense | CSR | transient / dense | CSR / dense | chosen (dense:csr) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["densities"]:
        for k in r["kernels"]:
            base = k["dense_linear_s"]
            names = ", ".join(k["layers"]) if len(k["layers"]) <= 2 else \
                f"{k['layers'][0]} (+{len(k['layers']) - 1})"
            lines.append(
                f"| {r['density']} | {names} | {tuple(k['shape'])} | {tuple(k['input'])} | "
                f"{k['density']:.3f} | {base * 1e3:.2f} | {k['transient_s'] * 1e3:.2f} | "
                f"{k['csr_s'] * 1e3:.2f} | {k['transient_s'] / base:.2f} | "
                f"{k['csr_s'] / base:.2f} | {k['chosen'].count('dense')}:"
                f"{k['chosen'].count('csr')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.2, 0.1])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--kernel-repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine, OpenMP's barriers wait "
                        "for a busy core and the timings are noise)")
    p.add_argument("--out", default="sparse")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if "/" in args.out else RESULTS / args.out
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
