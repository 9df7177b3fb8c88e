"""Batch rules for rows reordered by a sort: the mixture-of-experts dispatch keeps samples apart.

A mixture-of-experts layer (Hugging Face's ``grouped_mm`` experts, the default for Mixtral,
Qwen-MoE...) flattens the tokens, sorts the (token, expert) pairs by expert, gathers the tokens in
that order, multiplies each row by its expert's matrix (a grouped matmul whose offsets count the
rows per expert), weights them, and puts the rows back in order with the sort's inverse::

    ids, perm = sort(expert_ids)                 # along the batch dim
    x = hidden[perm // k]; w = weights[perm]     # gathered in sorted order
    offs = cumsum(histc(ids))                    # rows per expert
    y = grouped_mm(x, W, offs) * w[:, None]      # row by row, each by its own expert
    inv = empty_like(perm); inv[perm] = arange(n)
    out = y[inv].view(tokens, k, h).sum(1)       # back in batch order

Each row is computed from its own token alone, and its expert is its own key, so a microbatch
computes the same rows: the step keeps samples apart although the sort and the gathers work
along the batch dim. :func:`reordered_rule` follows such values (:class:`Reordered`) and returns
``None`` for anything else: the general rules then see an unbatched value computed from batched
ones, which the analysis treats conservatively.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from fxmem.levers.microbatch.ops import (GROUPED_MM_OPS, SAME_OPS, SLICE_OPS, VIEW_OPS, BatchState,
                                         Problem, Reordered, place_values, shape_of)

__all__ = ["reordered_rule", "strip_reordered"]

ROW_KINDS = ("keys", "rows", "index")  # computed row by row from the rows of a sort's order


def strip_reordered(out):
    """``out`` (a state or a list of them) with no :class:`Reordered` left: what a rule that does
    not follow sorted rows returns for them."""
    def one(v):
        return v if v is None or v.reordered is None else dataclasses.replace(v, reordered=None)
    return [one(v) for v in out] if isinstance(out, list) else one(out)


def reordered_rule(prop, op):
    """The state(s) of ``op`` where it follows rows in a sort's order, else None."""
    name = op.name
    if name == "sort":
        return _sort(prop, op)
    if not any(prop.state(a).reordered is not None for a in op.tensors):
        return None
    if name in SAME_OPS:
        return op.s
    if name in ("floor_divide", "div"):  # positions // k (a token's (token, expert) pairs)
        out = _floor_divide(prop, op)
        if out is not None:
            return out
    if torch.Tag.pointwise in op.node.target.tags:
        return _pointwise(prop, op)
    rule = _RULES.get(name)
    return rule(prop, op) if rule is not None else None


def _state(r: Reordered) -> BatchState:
    return BatchState(dep=True, reordered=r)


def _sort(prop, op):
    """sort of a 1-D batched value whose batch is its top digit: the sorted keys, and the
    positions they came from."""
    s, kw = op.s, op.kw
    if s is None or s.dim != 0 or s.outer != 1 or len(shape_of(op.x)) != 1 \
            or kw.get("dim", -1) not in (0, -1):
        return None
    size = shape_of(op.x)[0]
    return [_state(Reordered("keys", op.node.name, 0, size)),
            _state(Reordered("index", op.node.name, 0, size))]


def _pointwise(prop, op):
    """Operands in one sort's order, row by row; the others must not vary along the rows."""
    val = op.val
    shape = tuple((val[0] if isinstance(val, (list, tuple)) else val).shape)
    r = len(shape)
    rows = set()
    for a in op.tensors:
        s = prop.state(a)
        if s.dim is not None:
            raise Problem("batch_mixing", "combines rows in a sort's order with rows in the "
                          "batch's order")
        if s.reordered is not None:
            if s.reordered.kind not in ROW_KINDS:
                return None
            rows.add((s.reordered.sort, s.reordered.dim + r - len(shape_of(a)), s.reordered.size))
    if len(rows) != 1:
        raise Problem("batch_mixing", "combines rows of different sorts")
    sort, d, size = rows.pop()
    for a in op.tensors:
        s, i = prop.state(a), d - (r - len(shape_of(a)))
        if s.reordered is None and 0 <= i and shape_of(a)[i] != 1 and i not in s.free:
            raise Problem("batch_mixing", "combines rows in a sort's order with a value that "
                          "varies along them")
    out = _state(Reordered("rows", sort, d, size))
    return [out] * len(val) if isinstance(val, (list, tuple)) else out


def _floor_divide(prop, op):
    """positions // c: positions in a dim c times shorter, the same sample's (batch on top)."""
    s, other = op.s, op.kw.get("other")
    if op.name == "div" and op.kw.get("rounding_mode") != "floor":
        return None
    r = s.reordered if s is not None else None
    if r is None or r.kind != "index" or isinstance(other, torch.fx.Node) \
            or not isinstance(other, int) or other < 1:
        return None
    div = r.div * other
    if r.size % div or (r.size // div) % prop.B:
        return None
    return _state(dataclasses.replace(r, div=div))


def _view(prop, op):
    """A view that keeps the sorted dim whole (unsqueeze, squeeze, a reshape of other dims)."""
    r = op.s.reordered
    if r is None or r.kind not in ROW_KINDS:
        return None
    old, new = shape_of(op.x), tuple(op.val.shape)
    po, pn = place_values(old), place_values(new)
    e = next((e for e in range(len(new)) if new[e] == old[r.dim] and pn[e] == po[r.dim]), None)
    return None if e is None else _state(dataclasses.replace(r, kind="rows", dim=e))


def _split(prop, op):
    """split, chunk... along another dim than the sorted one."""
    r = op.s.reordered
    n = len(shape_of(op.x))
    if r is None or r.kind not in ROW_KINDS or op.name not in (
            "split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "chunk",
            "unsafe_chunk") or op.kw.get("dim", 0) % n == r.dim:
        return None
    return [_state(dataclasses.replace(r, kind="rows"))] * len(op.val)


def _index(prop, op):
    """Gather rows by a sort's positions (into sorted order), or by its inverse (back)."""
    s, indices = op.s, op.kw["indices"]
    pos = [i for i, t in enumerate(indices) if t is not None]
    if len(pos) != 1 or not isinstance(indices[pos[0]], torch.fx.Node) \
            or len(shape_of(indices[pos[0]])) != 1:
        return None
    d, idx = pos[0], prop.state(indices[pos[0]]).reordered
    if idx is None:
        return None
    n = shape_of(op.x)[d]
    if idx.kind == "index" and s.dim == d and s.outer == 1 and n == idx.size // idx.div:
        return _state(Reordered("rows", idx.sort, d, idx.size))  # into the sort's order
    r = s.reordered
    if idx.kind == "inverse" and r is not None and r.kind in ROW_KINDS and r.sort == idx.sort \
            and r.dim == d and n == idx.size:
        return BatchState(d, 1)  # back in the batch's order
    return None


def _histc(prop, op):
    """Counting the sorted keys: how many rows each group has."""
    r = op.s.reordered
    return _state(Reordered("groups", r.sort, 0, r.size)) if r is not None and r.kind == "keys" \
        else None


def _cumsum(prop, op):
    """The running count of a group's rows: the grouped matmul's offsets."""
    r = op.s.reordered
    return op.s if r is not None and r.kind == "groups" else None


def _grouped_mm(prop, op):
    """A grouped matmul of rows in a sort's order, each by its own key's matrix."""
    args = list(op.node.args) + list(op.node.kwargs.values())
    a = op.x
    offs = op.kw.get("offs")
    sa = prop.state(a).reordered
    so = prop.state(offs).reordered if isinstance(offs, torch.fx.Node) else None
    if sa is None or sa.kind not in ROW_KINDS or sa.dim != 0 or len(shape_of(a)) != 2 \
            or so is None or so.kind != "groups" or so.sort != sa.sort:
        return None
    others = [t for t in args if isinstance(t, torch.fx.Node) and t is not a and t is not offs]
    if any(prop.state(t).dim is not None or prop.state(t).reordered is not None or prop.state(t).dep
           for t in others):
        return None  # the matrices must not come from the batch
    return _state(Reordered("rows", sa.sort, 0, sa.size))


def _index_put(prop, op):
    """inverse[positions] = arange(n): the sort's inverse permutation."""
    kw = op.kw
    indices, values = kw["indices"], kw["values"]
    if kw.get("accumulate") or len(indices) != 1 or not isinstance(indices[0], torch.fx.Node):
        return None
    idx, x = prop.state(indices[0]).reordered, op.s
    v = prop.state(values)
    if idx is None or idx.kind != "index" or idx.div != 1 or x is None or x.dim is not None \
            or 0 not in x.free or v is None or v.iota != 0 or len(shape_of(values)) != 1 \
            or shape_of(values)[0] != idx.size or shape_of(op.x) != (idx.size,):
        return None
    return _state(Reordered("inverse", idx.sort, 0, idx.size))


_RULES = {
    **dict.fromkeys(VIEW_OPS, _view), **dict.fromkeys(SLICE_OPS, _split),
    "index": _index, "_unsafe_index": _index, "histc": _histc, "cumsum": _cumsum,
    **dict.fromkeys(GROUPED_MM_OPS, _grouped_mm), "index_put": _index_put,
}
