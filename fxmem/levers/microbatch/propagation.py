"""Which dim of every forward value carries the batch, and which forward ops mix samples.

One pass over a :class:`~fxmem.graph.capture.CapturedStep`'s forward graph, from the fake tensors'
shapes alone. A batched value has a dim holding the batch as one digit of its index: a merged
``(B*T, C)`` dim counts (sample i owns rows ``i*T..(i+1)*T``), and so does the ``(T*B, C)`` that
``nn.MultiheadAttention`` makes (``outer`` = T). An unbatched value records the dims its values do
not vary along (``free``: constants, broadcasts, i.i.d. random masks) and whether it is
``arange`` along a dim (``iota``), so that a causal mask built as ``(B, 1, T, T)`` from
``arange(T)``, or ``x[arange(B), y]``, keeps samples apart. Ops are handled by rule families
(pointwise, views, reductions, matmuls, normalisations, indexing...); an op the rules do not know,
fed a batched value, is reported as coupling: the analysis is conservative. An in-place write into
a view updates the value the view shows; an empty part of a concatenation (a cache's first
``torch.tensor([])``) adds nothing; rows a sort reorders along the batch (a mixture of experts'
dispatch) are followed by :mod:`fxmem.levers.microbatch.reorder`.
"""

from __future__ import annotations

import dataclasses
import logging
import operator

import torch
import torch.fx

from fxmem.levers.microbatch.ops import (ALONG_OPS, ATTENTION_OPS, BATCH_NORM_OPS, CONST_OPS,
                        EINSUM_OPS, LOSS_OPS, NLL_OPS, REDUCE_OPS, SAME_OPS, SLICE_OPS, U_AWARE_OPS,
                        VIEW_OPS, Problem, leading_independent, op_kwargs, op_name,
                        place_values, shape_of)
from fxmem.levers.microbatch.ops import BatchState as _V
from fxmem.levers.microbatch.reorder import reordered_rule, strip_reordered
from fxmem.levers.microbatch.states import (RuleOp, all_free, arange, kept_where_shown, numel,
                                            per_output, unbatched)
from fxmem.graph.capture import CapturedStep
from fxmem.passes.rng_replay import is_random
from fxmem.graph.torch_compat import is_op_overload

__all__ = ["Propagation"]

log = logging.getLogger(__name__)


class Propagation:
    """A state per forward value (``state(node)``), the ops that mix samples (``problems``: node ->
    :class:`Problem`) and the buffers the forward updates in place (``mutated``)."""

    def __init__(self, step: CapturedStep, batch: int, input_dims: dict[str, int | None]):
        self.step, self.B = step, batch
        self.S: dict[str, object] = {}
        self.problems: dict[torch.fx.Node, Problem] = {}
        self.mutated: dict[str, None] = {}
        self.base: dict[str, torch.fx.Node] = {}  # a view -> the value whose memory it shows
        for node in step.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.S[node.name] = _V(input_dims.get(node.name))
            elif node.op == "call_function" and node.name not in step.backward_nodes:
                self._visit(node)

    def state(self, x) -> _V | None:
        s = self.S.get(x.name) if isinstance(x, torch.fx.Node) else None
        return s if isinstance(s, _V) else None

    def _visit(self, node):
        val = node.meta.get("val")
        if node.target is operator.getitem:
            parent = self.S.get(node.args[0].name)
            self.S[node.name] = parent[node.args[1]] if isinstance(parent, list) else parent
            if node.args[0].name in self.base:  # one of split's views
                self.base[node.name] = self.base[node.args[0].name]
            return
        if not is_op_overload(node.target) \
                or not isinstance(val, (torch.Tensor, list, tuple)):
            return
        tensors = [a for a in node.all_input_nodes if self.state(a) is not None]
        batched = [a for a in tensors if self.state(a).dim is not None]
        for a, x in zip(node.target._schema.arguments, node.args):  # in-place updates of buffers
            if a.alias_info is not None and a.alias_info.is_write and isinstance(x, torch.fx.Node) \
                    and x.name in self.step.buffer_names:
                self.mutated[self.step.buffer_names[x.name]] = None
        try:
            out = self._rule(node, op_name(node), tensors, batched)
            self._check_write(node, out)
            self._write_through(node, out)
        except Problem as p:
            self.problems[node] = p
            out = self._guess(node, batched)
        except Exception as exc:  # a rule that does not fit this op's arguments: do not guess
            log.debug("batch propagation: no rule fits %s: %s", node.format_node(), exc)
            if batched:
                self.problems[node] = Problem("unsupported_op", f"fxmem cannot analyse it ({exc})")
            out = self._guess(node, batched)
        dep = any(self.state(a).dim is not None or self.state(a).dep for a in tensors)
        fix = lambda v: v if v is None or v.dim is not None else dataclasses.replace(v, dep=dep)
        self.S[node.name] = [fix(v) for v in out] if isinstance(out, list) else fix(out)
        returns, first = node.target._schema.returns, node.args[0] if node.args else None
        if isinstance(first, torch.fx.Node) and returns and all(
                r.alias_info is not None and not r.alias_info.is_write for r in returns):
            self.base[node.name] = self.base.get(first.name, first)

    def _write_through(self, node, out):
        """An in-place op on a view writes into the value the view shows (``shifted[:, 1:] =
        labels[:, :-1]`` in T5's decoder inputs): per-sample values written along the view's batch
        dim make that value batched along the dim its memory shares, when the rest of it does not
        vary along that dim; later reads of it see the batch."""
        args, view = node.target._schema.arguments, node.args[0] if node.args else None
        if not (args and args[0].alias_info is not None and args[0].alias_info.is_write
                and isinstance(view, torch.fx.Node) and view.name in self.base
                and isinstance(out, _V) and out.dim is not None):
            return
        base = self.base[view.name]
        v, b = view.meta["val"], base.meta["val"]
        d = next((d for d in range(b.dim()) if b.shape[d] == v.shape[out.dim]
                  and b.stride(d) == v.stride(out.dim)), None)
        s = self.state(base)
        if d is None or (s.dim is not None and (s.dim, s.outer) != (d, out.outer)):
            raise Problem("batch_mixing", f"writes per-sample values into a view of {base.name} "
                          "along another dim than its batch")
        if s.dim is None:
            if base.op == "placeholder" or d not in s.free:
                raise Problem("batch_mixing", f"writes per-sample values into {base.name}, whose "
                              "other values vary along the batch dimension")
            self.S[base.name] = _V(d, out.outer)

    def _check_write(self, node, out):
        args, first = node.target._schema.arguments, node.args[0] if node.args else None
        if (args and args[0].alias_info is not None and args[0].alias_info.is_write
                and isinstance(first, torch.fx.Node) and first.op == "placeholder"
                and isinstance(out, _V) and out.dim is not None and self.state(first).dim is None):
            raise Problem("batch_mixing", f"writes per-sample values into {first.name}")

    def _guess(self, node, batched):
        """After a problem: keep the batch dim where the shape still shows it."""
        s = self.state(batched[0]) if batched else None
        size = shape_of(batched[0])[s.dim] if batched else None
        return kept_where_shown(node.meta["val"], s, size)

    def _one(self, states: set, what: str) -> tuple[int, int] | None:
        if len(states) > 1:
            raise Problem("batch_mixing", f"{what} values batched along different dims")
        return states.pop() if states else None

    def _broadcast(self, out_shape, args) -> _V:
        r = len(out_shape)
        off = lambda a: r - len(shape_of(a))
        b = self._one({(self.state(a).dim + off(a), self.state(a).outer) for a in args
                       if self.state(a).dim is not None}, "combines")
        if b:
            for a in args:
                s, i = self.state(a), b[0] - off(a)
                if s.dim is None and 0 <= i and shape_of(a)[i] != 1 and i not in s.free:
                    raise Problem("batch_mixing", "combines each sample with a value that varies "
                                   "along the batch dimension but is not computed from the sample")
            return _V(*b)
        return _V(free=frozenset(j for j in range(r) if all(
            j < off(a) or shape_of(a)[j - off(a)] == 1 or j - off(a) in self.state(a).free
            for a in args)))

    def _rule(self, node, name, tensors, batched):
        """The state(s) of ``node``'s output(s), or :class:`Problem` where the op mixes samples.

        Constants, ``arange`` and ops on unbatched values that no rule tracks come first; then
        ops that keep their input's state, pointwise ops (by tag) and the rule ``_RULES`` names
        for the op; any other op keeps samples apart only along the leading dims that
        :func:`leading_independent` vouches for."""
        kw, x = op_kwargs(node), node.args[0] if node.args else None
        op = RuleOp(node, name, kw, node.meta["val"], x, self.state(x), tensors, batched)
        tags = node.target.tags
        if name in CONST_OPS:
            return all_free(op.val)
        if name == "arange":
            return arange(kw)
        reordered = reordered_rule(self, op)  # rows a sort put in its order (mixture of experts)
        if reordered is not None:
            return reordered
        return strip_reordered(self._general_rule(op, tags))

    def _general_rule(self, op: RuleOp, tags):
        name, batched = op.name, op.batched
        random = is_random(op.node)  # draws numbers (attention with dropout_p 0 does not)
        if not batched and name not in U_AWARE_OPS and torch.Tag.pointwise not in tags:
            return all_free(op.val) if random else unbatched(op.val)
        if name in SAME_OPS:
            return op.s
        if torch.Tag.pointwise in tags or random or name in ("copy", "masked_fill", "where"):
            return self._pointwise(op, random)
        rule = self._RULES.get(name)
        return rule(self, op) if rule is not None else self._leading_independent(op)

    def _pointwise(self, op: RuleOp, random: bool):
        """Pointwise ops (and copy, masked_fill, where, random draws): the operands broadcast."""
        val = op.val
        shape = tuple((val[0] if isinstance(val, (list, tuple)) else val).shape)
        out = self._broadcast(shape, op.tensors)
        if out.dim is None and random:  # i.i.d. draws: no position is special
            out = _V(free=frozenset(range(len(shape))))
        return [out, out] if isinstance(val, (list, tuple)) else out

    def _expand(self, op: RuleOp):
        """expand: the dims it adds in front and the size-1 dims it grows are free."""
        s, old, new = op.s, shape_of(op.x), tuple(op.val.shape)
        off = len(new) - len(old)
        if s.dim is not None:
            return s.at(s.dim + off)
        grown = {i + off for i in range(len(old)) if old[i] == 1 and new[i + off] != 1}
        return _V(free=frozenset({i + off for i in s.free} | set(range(off)) | grown),
                  iota=None if s.iota is None else s.iota + off)

    def _permute(self, op: RuleOp):
        """permute, transpose, t: every dim (batch, free, iota) moves where the op puts it."""
        s, name, kw = op.s, op.name, op.kw
        n = len(shape_of(op.x))
        order = [d % n for d in kw["dims"]] if name == "permute" else list(range(n))
        if name == "transpose" or (name == "t" and n == 2):
            a, b = (kw["dim0"] % n, kw["dim1"] % n) if name == "transpose" else (0, 1)
            order[a], order[b] = order[b], order[a]
        m = {old: new for new, old in enumerate(order)}
        return s.at(m[s.dim]) if s.dim is not None else _V(
            free=frozenset(m[i] for i in s.free), iota=None if s.iota is None else m[s.iota])

    def _along(self, op: RuleOp):
        """Ops along a dim (softmax, cumsum, sort...): along the batch dim they mix samples."""
        s, kw, n = op.s, op.kw, len(shape_of(op.x))
        dims = kw["dims"] if "dims" in kw else kw.get("dim", -1)
        dims = {d % n for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        if s.dim is not None and s.dim in dims:
            raise Problem(ALONG_OPS[op.name], f"works along the batch dim {s.dim}")
        return per_output(s if s.dim is not None else _V(free=s.free - dims), op.val)

    def _embedding(self, op: RuleOp):
        """embedding: each looked-up row belongs to its index's sample; the table must not vary."""
        if self.state(op.kw["weight"]).dim is not None:
            raise Problem("batch_mixing", "looks up rows of a batched table")
        return self.state(op.kw["indices"])

    def _nll_loss(self, op: RuleOp):
        """nll_loss: input and target batched alike along dim 0, no reduction over the batch."""
        s, tgt = op.s, self.state(op.kw["target"])
        if s.dim != 0 or (tgt.dim, tgt.outer) != (0, s.outer):
            raise Problem("batch_mixing", "the loss's input and target are not batched along "
                           "their dim 0 alike")
        if op.kw["reduction"] != 0:
            raise Problem("batch_reduction", "reduces the loss over the batch")
        return [s, _V()]

    def _loss(self, op: RuleOp):
        """Elementwise losses (mse, l1...): the operands broadcast; no reduction over the batch."""
        out = self._broadcast(shape_of(op.x), op.tensors)
        if op.kw["reduction"] != 0:
            raise Problem("batch_reduction", "reduces the loss over the batch")
        return out

    def _constant_pad(self, op: RuleOp):
        """constant_pad_nd: padding the batch dim mixes samples; padded dims are no longer free."""
        s, n, pad = op.s, len(shape_of(op.x)), list(op.kw["pad"])
        padded = {n - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
        if s.dim in padded:
            raise Problem("batch_mixing", "pads the batch dimension")
        return s if s.dim is not None else _V(free=s.free - padded)

    def _leading_independent(self, op: RuleOp):
        """Any other op: samples stay apart when :func:`leading_independent` says the op works on
        its last k dims only and the batch dim comes before them."""
        x, batched = op.x, op.batched
        k = leading_independent(op.name, len(shape_of(x)) if x is not None else 0, op.kw)
        if k is None:
            raise Problem("unsupported_op", "fxmem does not know whether this op keeps samples "
                           "independent")
        d, outer = self._one({(self.state(a).dim, self.state(a).outer) for a in batched}, "mixes")
        if d >= len(shape_of(batched[0])) - k:
            raise Problem("batch_mixing", f"mixes the batch dim {d} with its last {k} dims")
        return kept_where_shown(op.val, _V(d, outer), shape_of(batched[0])[d])

    def _attention(self, op: RuleOp):
        """Attention kernels: queries, keys, values and the mask broadcast over their leading
        dims (a mask may not vary along the batch unless computed from the sample); the last two
        (positions, features) mix within a sample only."""
        shape = shape_of(op.x)
        b = self._broadcast(shape, [a for a in op.tensors if len(shape_of(a)) == len(shape)])
        if b.dim is None or b.dim >= len(shape) - 2:
            raise Problem("batch_mixing", "attends across the batch dimension")
        return kept_where_shown(op.val, b, shape[b.dim])

    def _view(self, op: RuleOp):
        """Views and reshapes: the batch is a digit of the flat index; a free or iota dim keeps
        its meaning where an output dim spans the same index range."""
        s, old, new = op.s, shape_of(op.x), tuple(op.val.shape)
        po, pn = place_values(old), place_values(new)
        if s.dim is not None:  # the batch is a digit of the flat index, place value lo, radix B
            lo = po[s.dim] * (old[s.dim] // (self.B * s.outer))
            for e in range(len(new)):
                if lo % pn[e] == 0 and new[e] % (lo // pn[e] * self.B) == 0 \
                        and (new[e] > 1 or self.B == 1):
                    return _V(e, new[e] // (lo // pn[e] * self.B))
            raise Problem("batch_mixing", f"reshapes {old} to {new}, splitting samples")
        ranges = {(po[i], old[i]): i for i in range(len(old))}
        free = {e for e in range(len(new)) if new[e] == 1 or ranges.get((pn[e], new[e])) in s.free}
        iota = next((e for e in range(len(new)) if s.iota is not None
                     and ranges.get((pn[e], new[e])) == s.iota), None)
        return _V(free=frozenset(free), iota=iota)

    def _reduce(self, op: RuleOp):
        """Reductions (sum, mean, max...): over the batch dim they reduce across samples."""
        s, shape, kw, val = op.s, shape_of(op.x), op.kw, op.val
        n, dims = len(shape), kw.get("dim")
        dims = list(range(n)) if dims is None or dims == [] else (
            [dims] if isinstance(dims, int) else list(dims))
        dims, keep = {d % max(n, 1) for d in dims}, bool(kw.get("keepdim"))
        if s.dim is not None:
            if s.dim in dims:
                raise Problem("batch_reduction", f"reduces over the batch dim {s.dim}")
            out = s.at(s.dim if keep else s.dim - sum(d < s.dim for d in dims))
        else:
            kept = [i for i in range(n) if keep or i not in dims]
            out = _V(free=frozenset(j for j, i in enumerate(kept) if i in s.free or i in dims))
        return per_output(out, val)

    def _slice(self, op: RuleOp):
        """slice, select, split, unbind, chunk: only a full slice may cut along the batch dim."""
        name, s, shape, kw, val = op.name, op.s, shape_of(op.x), op.kw, op.val
        d = kw.get("dim", 0) % len(shape)
        if name == "slice":
            start = kw["start"] in (None, 0)
            full = start and (kw["end"] is None or kw["end"] >= shape[d]) and kw["step"] == 1
            if s.dim == d and not full:
                raise Problem("batch_mixing", "takes a slice of the batch")
            return s if s.dim is not None else _V(
                free=s.free, iota=s.iota if (s.iota != d or start) else None)
        if s.dim == d:
            raise Problem("batch_mixing", "selects or splits samples of the batch")
        if name in ("select", "unbind"):
            m = lambda i: i - (i > d)
            out = s.at(m(s.dim)) if s.dim is not None else _V(
                free=frozenset(m(i) for i in s.free if i != d))
            return [out] * len(val) if name == "unbind" else out
        return [s] * len(val)

    def _cat(self, op: RuleOp):
        """cat along dim d, or stack into a new dim d (the inputs' dims from d on move up)."""
        name, kw, val = op.name, op.kw, op.val
        parts = [t for t in kw["tensors"] if isinstance(t, torch.fx.Node)]
        n, new = val.dim(), name == "stack"
        if not new and any(numel(t) for t in parts):  # an empty part (HF's empty cache, a 1-D
            parts = [t for t in parts if numel(t)]  # torch.tensor([])) adds no element
            if len(parts) == 1 and shape_of(parts[0]) == tuple(val.shape):
                return self.state(parts[0])  # the other part, as it is
        d = kw["dim"] % n
        up = lambda i: i + (new and i >= d)
        b = self._one({(up(self.state(t).dim), self.state(t).outer) for t in parts
                       if self.state(t).dim is not None}, "concatenates")
        if b and b[0] == d:
            raise Problem("batch_mixing", "concatenates along the batch dimension")
        if b:
            if any(self.state(t).dim is None and b[0] not in {up(i) for i in self.state(t).free}
                   for t in parts):
                raise Problem("batch_mixing", "concatenates samples with a per-position value")
            return _V(*b)
        return _V(free=frozenset(i for i in range(n) if i != d
                                 and all(i in {up(j) for j in self.state(t).free} for t in parts)))

    def _index(self, op: RuleOp):
        """index (advanced indexing): the batch dim may be indexed only by an arange over it."""
        x, indices, out_shape = op.x, op.kw["indices"], tuple(op.val.shape)
        s, shape = self.state(x), shape_of(x)
        pos = [i for i, t in enumerate(indices) if t is not None]
        nb = len(out_shape) - (len(shape) - len(pos))
        adjacent = pos == list(range(pos[0], pos[-1] + 1))
        start = pos[0] if adjacent else 0
        rest = [i for i in range(len(shape)) if i not in pos]
        out_of = {i: (i if i < pos[0] else i - len(pos) + nb) if adjacent else nb + rest.index(i)
                  for i in rest}
        at = lambda k, j: start + nb - len(shape_of(indices[k])) + j  # out dim of index k's dim j

        def flat(k, e):  # index k does not vary along output dim e
            j = e - at(k, 0)
            return not 0 <= j < len(shape_of(indices[k])) or shape_of(indices[k])[j] == 1 \
                or j in self.state(indices[k]).free
        idx_b = {(at(k, self.state(indices[k]).dim), self.state(indices[k]).outer)
                 for k in pos if self.state(indices[k]).dim is not None}
        if s.dim is not None and s.dim not in pos:
            if idx_b:
                raise Problem("batch_mixing", "indexes a batched value with batched indices")
            return s.at(out_of[s.dim])
        if s.dim is not None:  # the batch dim is indexed: only by arange over all of it
            t = self.state(indices[s.dim])
            e = None if t.iota is None else at(s.dim, t.iota)
            if e is None or shape_of(indices[s.dim])[t.iota] != shape[s.dim] \
                    or idx_b - {(e, s.outer)} \
                    or not all(flat(k, e) or self.state(indices[k]).dim is not None
                               for k in pos if k != s.dim):
                raise Problem("batch_mixing", "gathers samples along the batch dimension")
            return s.at(e)
        if idx_b:
            e, outer = self._one(idx_b, "indexes with")
            if not all(self.state(indices[k]).dim is not None or flat(k, e) for k in pos):
                raise Problem("batch_mixing", "indexes with a per-position index")
            return _V(e, outer)
        free = {out_of[i] for i in rest if i in s.free}
        free |= {e for e in range(start, start + nb) if all(k in s.free or flat(k, e) for k in pos)}
        return _V(free=frozenset(free))

    def _einsum(self, op: RuleOp):
        """Matmuls (mm, bmm, addmm...) as einsums: contracting over the batch dim reduces it."""
        node, name, val = op.node, op.name, op.val
        ins, out = EINSUM_OPS[name].split("->")
        ops = list(zip(node.args[1:3] if name.startswith("add") else node.args[:2], ins.split(",")))
        b = self._one({(sub[self.state(a).dim], self.state(a).outer) for a, sub in ops
                       if self.state(a).dim is not None}, "multiplies")
        if b is None:  # an output dim is free when no operand varies along it
            flat = lambda a, sub, c: c not in sub or shape_of(a)[sub.index(c)] == 1 \
                or sub.index(c) in self.state(a).free
            free = frozenset(i for i, c in enumerate(out) if all(flat(a, sub, c) for a, sub in ops))
            if name.startswith("add"):  # and the bias does not either
                free &= self._broadcast(tuple(val.shape), [node.args[0]]).free
            return _V(free=free)
        if b[0] not in out:
            raise Problem("batch_reduction", "contracts over the batch dimension")
        for a, sub in ops:
            s, j = self.state(a), sub.find(b[0])
            if s.dim is None and j >= 0 and shape_of(a)[j] != 1 and j not in s.free:
                raise Problem("batch_mixing", "multiplies samples by a per-position value")
        res = _V(out.index(b[0]), b[1])
        if name.startswith("add"):  # the bias broadcasts like a pointwise operand
            bias, j = self.state(node.args[0]), res.dim - (val.dim() - len(shape_of(node.args[0])))
            if (bias.dim is not None and (bias.dim, bias.outer) != (j, res.outer)) or (
                    bias.dim is None and 0 <= j and shape_of(node.args[0])[j] != 1
                    and j not in bias.free):
                raise Problem("batch_mixing", "adds a per-position value to each sample")
        return res

    def _batch_norm(self, op: RuleOp):
        """BatchNorm: in training mode it normalises with the batch's statistics (a problem); in
        eval mode it is per sample unless the batch is its channel dim."""
        name, kw, s, val = op.name, op.kw, op.s, op.val
        training = kw.get("training", name in ("_native_batch_norm_legit_functional",
                                               "_batch_norm_with_update"))
        if training:  # its schema does not mark the running statistics it updates as written
            for x in (kw.get("running_mean"), kw.get("running_var")):
                if isinstance(x, torch.fx.Node) and x.name in self.step.buffer_names:
                    self.mutated[self.step.buffer_names[x.name]] = None
            raise Problem("batch_norm", "BatchNorm in training mode normalises with the batch's "
                           "statistics", kw.get("momentum", kw.get("exponential_average_factor")))
        if s.dim == 1:
            raise Problem("batch_mixing", "the batch is BatchNorm's channel dim")
        return [s if isinstance(v, torch.Tensor) and v.dim() == val[0].dim() else _V()
                for v in val]

    #: op name -> its rule, for the ops that :meth:`_rule` does not settle first
    _RULES = {
        **dict.fromkeys(VIEW_OPS, _view), "expand": _expand,
        **dict.fromkeys(("permute", "transpose", "t"), _permute),
        **dict.fromkeys(REDUCE_OPS, _reduce), **dict.fromkeys(ALONG_OPS, _along),
        **dict.fromkeys(SLICE_OPS, _slice), **dict.fromkeys(("cat", "stack"), _cat),
        **dict.fromkeys(("index", "_unsafe_index"), _index), **dict.fromkeys(EINSUM_OPS, _einsum),
        "embedding": _embedding, **dict.fromkeys(BATCH_NORM_OPS, _batch_norm),
        **dict.fromkeys(NLL_OPS, _nll_loss), **dict.fromkeys(LOSS_OPS, _loss),
        "constant_pad_nd": _constant_pad, **dict.fromkeys(ATTENTION_OPS, _attention),
    }
