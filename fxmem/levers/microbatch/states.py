"""Small pieces the batch rules share: the record one op is seen as (:class:`RuleOp`) and the
output states the rules return most often (unbatched, all dims free, arange, kept where the batch
dim still shows)."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from fxmem.levers.microbatch.ops import BatchState as _V
from fxmem.levers.microbatch.ops import shape_of

__all__ = ["RuleOp", "all_free", "unbatched", "numel", "arange", "per_output", "kept_where_shown"]


@dataclasses.dataclass(frozen=True)
class RuleOp:
    """One forward op as the rules see it: its node, op name, arguments by schema name (``kw``),
    fake output(s) (``val``), first argument (``x``) and that argument's state (``s``), and its
    tensor inputs (``tensors``), of which ``batched`` are batched."""

    node: torch.fx.Node
    name: str
    kw: dict
    val: object
    x: object
    s: _V | None
    tensors: list
    batched: list


def all_free(val) -> _V:
    """An unbatched value equal at every position (a constant, i.i.d. draws): all dims free."""
    return _V(free=frozenset(range(val.dim() if isinstance(val, torch.Tensor) else 0)))


def unbatched(val):
    """Unbatched output(s) with nothing known of them: a state per tensor, None for the rest."""
    if isinstance(val, (list, tuple)):
        return [_V() if isinstance(v, torch.Tensor) else None for v in val]
    return _V()


def numel(x) -> int:
    n = 1
    for s in shape_of(x):
        n *= s
    return n


def arange(kw) -> _V:
    """arange: iota along its dim 0 when it counts 0, 1, 2... (start 0, step 1)."""
    start, step = kw.get("start", 0), kw.get("step", 1)
    return _V(iota=0 if (start in (0, None) and step in (1, None)) else None)


def per_output(out: _V, val):
    """``out`` for each output of a multi-output op, else ``out`` itself."""
    return [out] * len(val) if isinstance(val, (list, tuple)) else out


def kept_where_shown(val, s: _V | None, size):
    """Output state(s): ``s`` wherever an output tensor still has a dim ``s.dim`` of the batch's
    ``size``; unbatched for the other tensors (and for all when ``s`` is None); None for a
    non-tensor."""
    def one(v):
        if not isinstance(v, torch.Tensor):
            return None
        return s if s is not None and v.dim() > s.dim and v.shape[s.dim] == size else _V()
    return [one(v) for v in val] if isinstance(val, (list, tuple)) else one(val)
