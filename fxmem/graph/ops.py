"""What an op of a captured graph does to memory: the one place for op semantics.

Every part of fxmem asks the same few questions of an FX node -- which tensors does it hold, does
it alias its input (a view), does it write to an argument (a mutation), how many bytes does its
value take -- and answers them here, from the op's schema and the fake tensors the tracer
recorded in ``node.meta["val"]``. Whether an op draws random numbers is
:func:`fxmem.passes.rng_replay.is_random`'s to say (the pass that replays them).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from fxmem.graph import torch_compat

__all__ = ["schema_arguments", "tensors", "node_value", "input_tensors", "value_nbytes", "storage_nbytes",
           "is_view", "aliases_input", "writes_argument", "base_name", "op_name", "is_pointwise"]

_MISSING = object()
# ops whose output shares its input's storage though their schema does not say so
_VIEW_LIKE = frozenset({"_unsafe_view", "alias"})


def tensors(val: Any) -> list[torch.Tensor]:
    """The tensors in a node's value, nested tuples and lists flattened (a multi-output op's)."""
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in tensors(v)]
    return []


def node_value(node: torch.fx.Node) -> Any:
    """The node's traced value (a fake tensor, a tuple of them, a symbol...); for a ``get_attr``
    without one, the module attribute itself. ``None`` when there is none."""
    val = node.meta.get("val", _MISSING)
    if val is _MISSING and node.op == "get_attr":
        val = getattr(node.graph.owning_module, node.target, _MISSING)
    return None if val is _MISSING else val


def input_tensors(node: torch.fx.Node) -> list[torch.Tensor]:
    """The tensors an op reads (its input nodes' values)."""
    return [t for n in node.all_input_nodes for t in tensors(node_value(n))]


def value_nbytes(node: Any) -> int:
    """Bytes of a node's tensor value by its shape (``numel * element_size``); 0 for a non-node
    or a value that is not one tensor."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def storage_nbytes(node: torch.fx.Node) -> int:
    """Bytes of the storage under a node's tensor value (a view's base included)."""
    val = node.meta.get("val")
    return int(val.untyped_storage().nbytes()) if isinstance(val, torch.Tensor) else 0


def base_name(target: Any) -> str:
    """An op's name without namespace or overload: "mm" for ``aten.mm.default``, "add_" for
    ``aten.add_.Tensor``; a Python callable's ``__name__``."""
    if torch_compat.is_op_overload(target):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def op_name(node: torch.fx.Node) -> str:
    """The op's name without overload or in-place underscore: "add" for ``aten.add_.Tensor``."""
    packet = getattr(node.target, "overloadpacket", None)
    name = packet.__name__ if packet is not None else getattr(node.target, "__name__", "")
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def is_view(node: torch.fx.Node) -> bool:
    """By its schema, the op returns views of its inputs and writes nothing (``getitem`` of a
    tuple included): it costs no memory and no time, and is re-derived rather than saved."""
    target = node.target
    if target is operator.getitem:
        return True
    if not torch_compat.is_op_overload(target):
        return False
    returns = target._schema.returns
    schema_view = bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns)
    return schema_view or base_name(target) in _VIEW_LIKE


def writes_argument(node: torch.fx.Node) -> bool:
    """The op writes to one of its arguments (an in-place or ``out=`` op, ``copy_``), by its
    schema. A non-ATen callable other than ``getitem`` counts as writing: nothing says it does
    not."""
    target = node.target
    if not torch_compat.is_op_overload(target):
        return target is not operator.getitem
    return any(a.alias_info is not None and a.alias_info.is_write
               for a in target._schema.arguments)


def aliases_input(node: torch.fx.Node) -> bool:
    """Every tensor the op returns shares a storage with one of its inputs (by the fake tensors:
    views, in-place ops, ``detach``), so it allocates nothing."""
    outs = tensors(node.meta.get("val"))
    if not outs:
        return False
    ins = {torch_compat.storage_key(t.untyped_storage()) for t in input_tensors(node)}
    return all(torch_compat.storage_key(t.untyped_storage()) in ins for t in outs)


def is_pointwise(node: torch.fx.Node) -> bool:
    """The op is tagged pointwise (Inductor fuses it into its consumers)."""
    return torch_compat.is_op_overload(node.target) and torch.Tag.pointwise in node.target.tags


def schema_arguments(node: torch.fx.Node) -> dict[str, Any]:
    """An ATen op's arguments by schema name, positional or keyword, defaults filled in (None for
    an argument with no default that was not given)."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out
