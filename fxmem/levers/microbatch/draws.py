"""Which random ops of a step a microbatched run can draw exactly as the whole batch does.

Each random op of the whole batch's captured forward, in order, is either a
:class:`~fxmem.passes.microbatch_draws.Draw` -- its kind and parameters, the whole shape and the
batch dim its values follow -- which the microbatch-draws pass turns into reads of the step's draw
cache, or a reason why not; such an op stays a coupling of kind "random" (each microbatch would
draw its own values). The batch dim of a draw is that of the value whose shape it draws (through
``empty_like``/``zeros_like``..., the tensor they are like), from the batch propagation.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from fxmem.levers.microbatch.ops import CONST_OPS, op_name
from fxmem.levers.microbatch.propagation import Propagation
from fxmem.passes.microbatch_draws import Draw, draw_kind

__all__ = ["whole_draw"]

log = logging.getLogger(__name__)

# ops whose output only takes its input's shape (their values are new)
_LIKE_OPS = {"empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like"}
# ops that keep their input's values and shape
_SAME_OPS = {"clone", "detach", "alias", "contiguous", "_to_copy", "lift_fresh_copy"}


def _shape_source(like: torch.fx.Node) -> torch.fx.Node | None:
    """The value whose shape (and so whose batch dim) a draw into ``like`` takes: ``like``
    itself, or what an ``empty_like``... of it is like; None for a tensor made with a size of
    its own (``torch.empty(sizes)``), whose shape may or may not follow the batch."""
    while like.op == "call_function" and op_name(like) in _LIKE_OPS | _SAME_OPS:
        like = like.args[0]
    if like.op == "call_function" and op_name(like) in CONST_OPS:
        return None
    return like


def whole_draw(node: torch.fx.Node, prop: Propagation) -> Draw | str:
    """The whole-batch draw of random op ``node`` of the whole step's forward, or why the
    microbatches cannot read one."""
    found = draw_kind(node)
    if found is None:
        return (f"{node.target} draws values that fxmem cannot draw once for the whole batch "
                "(they depend on its input's values, or it takes a size or a generator)")
    kind, params, like = found
    val = node.meta["val"]
    out = val[0] if isinstance(val, (tuple, list)) else val
    drawn = like.meta.get("val") if kind == "dropout" else out
    if not isinstance(drawn, torch.Tensor):
        return "draws into a value that is not a tensor"
    if not (kind in ("bernoulli", "dropout") and drawn.device.type == "cpu") \
            and not drawn.is_contiguous():  # the CPU bernoulli draws in index order: any layout
        return "draws into a non-contiguous tensor: the whole batch's values are laid out by it"
    source = _shape_source(like)
    state = prop.state(source) if source is not None else None
    if state is None:
        return ("draws into a tensor made with a size of its own: fxmem cannot tell whether "
                "its shape follows the batch")
    shape = tuple(drawn.shape)
    if tuple(source.meta["val"].shape) != shape:
        return "draws a shape other than that of the value it is like"
    dim, rows = state.dim, 1
    if dim is not None:
        if state.outer != 1 or shape[dim] % prop.B:
            return (f"draws along dim {dim}, where the batch's samples are interleaved: a "
                    "microbatch's values are no slice of the whole batch's")
        rows = shape[dim] // prop.B
    return Draw(node.name, kind, params, shape, drawn.dtype, drawn.device, dim, rows)
