"""Adapter: a captured joint graph -> :class:`~fxmem.memory.simulation.StepStorages` (plain data).

Storage identity comes from the fake tensors the tracer recorded in ``node.meta["val"]``: fake
tensors share a storage exactly when the real ones would (views, ``_unsafe_view``, ``detach``,
in-place ops), so aliasing is read off the trace rather than guessed from op names.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from fxmem.graph.capture import CapturedStep, Role
from fxmem.graph.torch_compat import is_op_overload, storage_key
from fxmem.memory.simulation import StepStorages

__all__ = ["step_storages", "allocation_bytes", "scratch_bytes"]

_CUDA_ROUND = 512  # the CUDA caching allocator rounds every block up to 512 bytes
_ACCUMULATING_OPS = {torch.ops.aten.add.Tensor}
_RESIDENT_CATEGORY = {
    Role.PARAMETER: "parameters",
    Role.BUFFER: "buffers",
    Role.INPUT: "inputs",
    Role.TANGENT: "temporaries",
}


def allocation_bytes(nbytes: int, device: torch.device) -> int:
    """Bytes the device's allocator charges for a storage of ``nbytes``."""
    if device.type == "cuda" and nbytes > 0:
        return -(-nbytes // _CUDA_ROUND) * _CUDA_ROUND
    return int(nbytes)


def scratch_bytes(node: torch.fx.Node, device: torch.device, *, channels_last: bool = False) -> int:
    """Bytes an op allocates and frees inside itself, beyond its outputs. On the CPU,
    ``native_dropout`` draws its noise into a tensor like its input before making the bool mask
    (CUDA fuses it), and oneDNN's ``convolution_backward`` copies the output gradient and the
    input into its own layouts -- unless they are ``channels_last`` (as Inductor's layout
    optimisation makes them), when it only reorders the weight. The RNG-replay wrappers run the
    op they wrap."""
    if device.type != "cpu" or node.op != "call_function":
        return 0
    target, args = node.target, node.args
    if not is_op_overload(target) and args and is_op_overload(args[0]):
        target, args = args[0], args[1:]  # run_and_save_rng_state(op, *args)
    elif not is_op_overload(target) and len(args) > 1 and is_op_overload(args[1]):
        target, args = args[1], args[2:]  # run_with_rng_state(state, op, *args)
    if target is torch.ops.aten.convolution_backward.default and len(args) > 2:
        if channels_last:  # oneDNN works on channels-last tensors in place; it reorders the weight
            return 2 * _nbytes(args[2])
        # oneDNN reorders the output gradient and the input into its blocked layouts
        return sum(_nbytes(a) for a in args[:2])
    if target is not torch.ops.aten.native_dropout.default or not args:
        return 0
    train = args[2] if len(args) > 2 else node.kwargs.get("train", True)
    inp = args[0].meta.get("val") if isinstance(args[0], torch.fx.Node) else None
    if train is False or not isinstance(inp, torch.Tensor):
        return 0
    return inp.numel() * inp.element_size()


def _nbytes(arg) -> int:
    val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def _tensors(val) -> list[torch.Tensor]:
    """The tensors in a node's value, nested tuples flattened (a higher-order op's outputs)."""
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in _tensors(v)]
    return []


def step_storages(step: CapturedStep, device: torch.device | None = None, *,
                  channels_last: bool = False) -> StepStorages:
    """The storages a captured step creates, reads and keeps, in graph order.

    ``device`` selects the allocator's rounding (default: the step's device); ``channels_last``:
    the convolutions run channels-last (:func:`scratch_bytes`).
    """
    device = device or step.device
    gm = step.gm
    key_to_id: dict[object, int] = {}
    nbytes: list[int] = []
    created_by: list[int | None] = []  # op index, or None for resident storages
    node_storages: dict[str, tuple[int, ...]] = {}
    resident: set[int] = set()
    resident_category: dict[int, str] = {}

    def storage_ids(tensors, op_index):
        ids = []
        for t in tensors:
            storage = t.untyped_storage()
            key = storage_key(storage)
            if key not in key_to_id:
                key_to_id[key] = len(nbytes)
                nbytes.append(allocation_bytes(int(storage.nbytes()), device))
                created_by.append(op_index)
            ids.append(key_to_id[key])
        return tuple(ids)

    op_nodes: list[torch.fx.Node] = []
    creates: list[tuple[int, ...]] = []
    reads: list[tuple[int, ...]] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            val = node.meta.get("val")
            if node.op == "get_attr" and val is None:
                val = getattr(gm, node.target)
            ids = storage_ids(_tensors(val), None)
            node_storages[node.name] = ids
            for s in ids:
                resident.add(s)
                resident_category[s] = _RESIDENT_CATEGORY[step.roles[node.name]]
        elif node.op == "call_function" and node.target is operator.getitem:
            node_storages[node.name] = storage_ids(_tensors(node.meta.get("val")), len(op_nodes) - 1)
        elif node.op == "call_function":
            op_index = len(op_nodes)
            before = len(nbytes)
            ids = storage_ids(_tensors(node.meta.get("val")), op_index)
            node_storages[node.name] = ids
            scratch = scratch_bytes(node, device, channels_last=channels_last)
            if scratch:  # a storage of the op's own that nothing reads: freed right after it
                nbytes.append(allocation_bytes(scratch, device))
                created_by.append(op_index)
            op_nodes.append(node)
            creates.append(tuple(range(before, len(nbytes))))
            reads.append(
                tuple(sorted({s for inp in node.all_input_nodes for s in node_storages.get(inp.name, ())}))
            )

    output_node = gm.graph.output_node()
    pinned = {s for n in output_node.all_input_nodes for s in node_storages[n.name]}
    grad_storages = {s for name in step.grad_of for s in node_storages[name]}
    held = {s for name in [step.loss_node, *step.held_outputs] for s in node_storages[name]}
    backward_ops = {i for i, n in enumerate(op_nodes) if step.is_backward(n)}
    read_by_backward = {s for i in backward_ops for s in reads[i]}

    category = []
    for s, op in enumerate(created_by):
        if s in resident:
            category.append(resident_category[s])
        elif s in grad_storages:
            category.append("gradients")
        elif op in backward_ops:
            category.append("temporaries")
        elif s in held:  # held by the caller whether or not the backward reads it
            category.append("outputs")
        elif s in read_by_backward:
            category.append("saved activations")
        else:
            category.append("temporaries")

    accumulates = {}
    for i in backward_ops:
        node = op_nodes[i]
        if node.target in _ACCUMULATING_OPS and len(creates[i]) == 1:
            inputs = [s for inp in node.all_input_nodes for s in node_storages.get(inp.name, ())]
            accumulates[creates[i][0]] = tuple(s for s in inputs if s not in resident)

    return StepStorages(
        op_names=tuple(n.name for n in op_nodes),
        creates=tuple(creates),
        reads=tuple(reads),
        nbytes=tuple(nbytes),
        category=tuple(category),
        resident=frozenset(resident),
        pinned=frozenset(pinned),
        accumulates=accumulates,
        backward_start=min(backward_ops, default=len(op_nodes)),
        node_storages=node_storages,
    )
