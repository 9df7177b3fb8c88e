"""Prune and regrow one sparse layer, moving its optimizer state with its values.

The values vector keeps its length (nnz is fixed), so the ``nn.Parameter`` object, the optimizer's
reference to it and any compiled step that reads it stay valid: everything shaped like the values
-- the values, their ``.grad``, and each optimizer state tensor of that shape (Adam/AdamW's
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; SGD's ``momentum_buffer``) -- is rewritten in
place by the same permutation: a survivor keeps its entries, a regrown weight starts at zero (its
value and its state), a pruned weight's entries are dropped. Scalars (Adam's ``step``) are kept.
"""

from __future__ import annotations

import logging

import torch

from fxmem.levers.sparse.layers import INDEX_DTYPE, SparseLayer

__all__ = ["survivors", "random_free_positions", "top_gradient_positions", "rewire"]

log = logging.getLogger(__name__)


def survivors(values: torch.Tensor, n_prune: int) -> torch.Tensor:
    """The slots (sorted, int64) of the ``values.numel() - n_prune`` largest-magnitude values."""
    keep = values.numel() - n_prune
    slots = torch.topk(values.detach().abs(), keep, sorted=False).indices
    return slots.sort().values


def _occupied_mask(positions: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
    """Which of ``positions`` are in the sorted ``occupied``."""
    if occupied.numel() == 0:
        return torch.zeros_like(positions, dtype=torch.bool)
    at = torch.searchsorted(occupied, positions).clamp(max=occupied.numel() - 1)
    return occupied[at] == positions


def random_free_positions(numel: int, occupied: torch.Tensor, k: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` distinct flat positions in ``[0, numel)`` not in the sorted ``occupied``, drawn
    uniformly (SET's regrowth), without materialising a dense mask."""
    if k > numel - occupied.numel():
        raise ValueError(f"cannot regrow {k} weights: only {numel - occupied.numel()} are free")
    chosen = torch.empty(0, dtype=torch.long)
    occupied = occupied.cpu()
    while chosen.numel() < k:
        draw = torch.randint(0, numel, (2 * (k - chosen.numel()) + 16,), generator=generator)
        draw = draw[~_occupied_mask(draw, occupied)]
        merged = torch.cat([chosen, draw])
        first = _first_occurrences(merged)
        chosen = merged[first.sort().values]  # keep draw order: a uniform sample
    return chosen[:k].sort().values


def _first_occurrences(x: torch.Tensor) -> torch.Tensor:
    """The index of each distinct value's first occurrence in ``x``."""
    uniq, inverse = torch.unique(x, return_inverse=True)
    first = torch.full((uniq.numel(),), x.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(x.numel()), reduce="amin")
    return first


def top_gradient_positions(grad: torch.Tensor, occupied: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` flat positions not in ``occupied`` with the largest ``|grad|`` (RigL's
    regrowth; ``grad`` is the dense weight's gradient), sorted."""
    score = grad.detach().reshape(-1).abs()
    score[occupied.to(score.device)] = -1.0
    return torch.topk(score, k, sorted=False).indices.sort().values


def rewire(layer: SparseLayer, keep_slots: torch.Tensor, grown: torch.Tensor,
           optimizer: torch.optim.Optimizer | None = None) -> int:
    """Keep the values at ``keep_slots`` and add zeros at the flat positions ``grown``; the
    optimizer's state for ``layer.values`` is permuted the same way. Returns how many of the
    grown positions were among the pruned ones."""
    values = layer.values
    if keep_slots.numel() + grown.numel() != values.numel():
        raise ValueError(f"rewire keeps {keep_slots.numel()} and grows {grown.numel()} weights, "
                         f"but the layer holds {values.numel()}")
    device = values.device
    old = layer.indices.long()
    keep_slots, grown = keep_slots.to(device), grown.to(device)
    positions = torch.cat([old[keep_slots], grown])
    source = torch.cat([keep_slots, torch.full_like(grown, -1)])
    order = torch.argsort(positions)
    new_indices, source = positions[order], source[order]
    if new_indices.numel() > 1 and bool((new_indices[1:] == new_indices[:-1]).any()):
        raise ValueError("rewire: a grown position is already held")
    kept = source >= 0
    slots = source[kept]

    def remap(t: torch.Tensor) -> None:
        moved = torch.zeros_like(t)
        moved[kept] = t[slots]
        t.copy_(moved)

    with torch.no_grad():
        remap(values)
        if values.grad is not None:
            remap(values.grad)
        for state in _state_tensors(optimizer, values):
            remap(state)
        layer.indices.copy_(new_indices.to(INDEX_DTYPE))
    layer.indices_changed()
    return int(_occupied_mask(grown, old).sum())  # old is sorted; grown avoids the survivors


def _state_tensors(optimizer, values) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    state = optimizer.state.get(values, {})
    return [v for v in state.values()
            if isinstance(v, torch.Tensor) and v.shape == values.shape and v.dim() == 1]
