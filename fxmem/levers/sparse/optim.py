"""Point an optimizer built for the dense model at the sparse layers' values.

When a model is sparsified after its optimizer was built, each replaced layer's dense weight is
swapped for the layer's ``values`` in the optimizer's param groups, and the weight's state
tensors (Adam's moments, SGD's momentum) are read at the kept positions, so the kept weights
keep their state; scalars (``step``) are kept. The bias is the same Parameter object in both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from fxmem.levers.sparse.layers import SparseLayer

__all__ = ["rebind_optimizer"]

log = logging.getLogger(__name__)


def rebind_optimizer(optimizer: torch.optim.Optimizer,
                     replaced: Mapping[nn.Parameter, SparseLayer]) -> int:
    """Swap each dense weight in ``replaced`` (weight -> the sparse layer made from it) for the
    layer's values in ``optimizer``, with its state read at the kept positions. Returns how many
    were swapped."""
    by_id = {id(w): layer for w, layer in replaced.items()}
    swapped = 0
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            layer = by_id.get(id(p))
            if layer is None:
                continue
            params[i] = layer.values
            state = optimizer.state.pop(p, None)
            if state:
                optimizer.state[layer.values] = _state_at(state, p, layer)
            swapped += 1
    log.info("optimizer: %d dense weights swapped for sparse values", swapped)
    return swapped


def _state_at(state: dict, weight: nn.Parameter, layer: SparseLayer) -> dict:
    flat = layer.indices.long()
    moved = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == weight.shape:
            moved[key] = value.reshape(-1)[flat].clone()
        else:
            moved[key] = value
    return moved
