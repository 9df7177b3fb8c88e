"""Which layers are sparsified and at what density each.

**Eligible layers**: ``nn.Linear`` and ``nn.Conv2d`` (zero padding) whose weight belongs to that
module alone (a weight tied to another module, e.g. a language model's head tied to its
embedding, stays dense). With ``keep_dense="first_last"`` (the default) the model's first and last
weight layers -- the first and last ``Linear``/``Conv``/``Embedding`` in registration order --
stay dense, as in the sparse-training literature (they are small and sensitive); when one of
them is an embedding or a tied head it is not eligible anyway.

**Densities** (the fraction of non-zeros over the sparsified layers' weights is ``density``):

- ``"erk"`` (Erdős–Rényi-Kernel, Evci et al. 2020, the default): layer ``l`` gets
  ``eps * sum(shape_l) / prod(shape_l)``, with ``eps`` such that the non-zeros add up; a layer
  whose density would exceed 1 is made dense and ``eps`` solved again over the others;
- ``"uniform"``: every layer gets ``density``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

from torch import nn

__all__ = ["DISTRIBUTIONS", "eligible_layers", "layer_densities", "nnz_for"]

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("erk", "uniform")
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of weights held by more than one module."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layers: weight
    (in, out), ``x @ weight + bias``), recognised without importing transformers."""
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and getattr(module, "weight", None) is not None and module.weight.dim() == 2)


def _eligible(module: nn.Module) -> bool:
    if type(module) is nn.Linear or is_hf_conv1d(module):
        return True
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def eligible_layers(model: nn.Module, *, keep_dense: str | None = "first_last",
                    include: Iterable[str] | None = None,
                    exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The layers to sparsify, by qualified name, in registration order.

    ``include`` (names) restricts them; ``exclude`` removes some; ``keep_dense="first_last"``
    keeps the model's first and last weight layers dense (``None``: no such rule)."""
    if keep_dense not in ("first_last", None):
        raise ValueError(f"keep_dense must be 'first_last' or None, got {keep_dense!r}")
    named = list(model.named_modules())
    weight_layers = [n for n, m in named if isinstance(m, _WEIGHT_LAYERS) or is_hf_conv1d(m)]
    kept = set()
    if keep_dense == "first_last" and weight_layers:
        kept = {weight_layers[0], weight_layers[-1]}
    tied = _tied_weights(model)
    include = None if include is None else set(include)
    exclude = set(exclude)
    known = {n for n, _ in named}
    unknown = ((include or set()) | exclude) - known
    if unknown:
        raise ValueError(f"no module named {sorted(unknown)} in the model")
    chosen = {}
    for name, module in named:
        if not _eligible(module) or name in kept or name in exclude:
            continue
        if include is not None and name not in include:
            continue
        if id(module.weight) in tied:
            log.info("%s: weight tied to another module; left dense", name)
            continue
        chosen[name] = module
    return chosen


def layer_densities(shapes: Mapping[str, tuple[int, ...]], density: float | Mapping[str, float],
                    distribution: str = "erk") -> dict[str, float]:
    """Each layer's density. ``density`` is the overall fraction of non-zeros, or a mapping
    from layer name to its own density (then ``distribution`` is not used)."""
    if isinstance(density, Mapping):
        missing = set(shapes) - set(density)
        if missing:
            raise ValueError(f"no density given for {sorted(missing)}")
        out = {n: float(density[n]) for n in shapes}
    else:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        out = (_erk(shapes, float(density)) if distribution == "erk"
               else {n: float(density) for n in shapes})
    for name, d in out.items():
        if not 0.0 < d <= 1.0:
            raise ValueError(f"density of {name} must be in (0, 1], got {d!r}")
    return out


def _erk(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    target = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        rest = [n for n in shapes if n not in dense]
        if not rest:
            return {n: 1.0 for n in shapes}
        budget = target - sum(numel[n] for n in dense)
        eps = budget / sum(raw[n] * numel[n] for n in rest)
        over = max(rest, key=lambda n: raw[n])
        if eps * raw[over] <= 1.0:
            return {n: (1.0 if n in dense else eps * raw[n]) for n in shapes}
        dense.add(over)
        log.debug("ERK: %s dense (would be %.3f)", over, eps * raw[over])


def nnz_for(numel: int, density: float) -> int:
    """The number of non-zeros a layer of ``numel`` weights keeps at ``density`` (at least 1)."""
    return max(1, min(numel, round(density * numel)))
