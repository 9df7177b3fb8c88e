"""Adapter: forward + backward graphs of a plan -> :class:`StepStorages`, so the same simulation
predicts the rewritten step.

The forward graph runs first; the values it saves stay live until the backward's last read of
them (AOTAutograd clears its saved tensors before the backward runs, and the backward is called
boxed, so each input is freed after its last use). Backward graphs copy forward nodes with their
fake tensors, so a backward op's output is a new storage unless it aliases one of the backward's
own inputs or earlier values (a view).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from fxmem.graph.capture import CapturedStep, Role
from fxmem.graph.torch_compat import storage_key
from fxmem.memory.inductor import (
    Lowered,
    channels_last_copies,
    contiguous_values,
    free_after_kernel_groups,
    lower_storages,
    lowering_kinds,
    optimizes_layout,
    pool_buffers,
)
from fxmem.memory.simulation import StepStorages
from fxmem.memory.storages import _RESIDENT_CATEGORY, _tensors, allocation_bytes, scratch_bytes

__all__ = ["plan_storages"]

# extern kernels Inductor calls with an ``out=`` buffer it allocated (so one its pool can supply)
_OUT_EXTERNS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.baddbmm.default}


def plan_storages(
    step: CapturedStep, fw: torch.fx.GraphModule, bw: torch.fx.GraphModule, *, num_fwd_outputs: int,
    lowering: str = "eager",
) -> StepStorages:
    """Storages of the forward then the backward graph. ``step`` is the labelled joint graph the
    two were split from (for roles); the forward's first ``num_fwd_outputs`` outputs are the
    caller's, the rest are saved for the backward. ``lowering="inductor"``: as Inductor runs the
    two graphs (:func:`fxmem.memory.inductor.lower_storages`)."""
    if lowering not in ("eager", "inductor"):
        raise ValueError(f"lowering must be 'eager' or 'inductor', got {lowering!r}")
    device = step.device
    nbytes: list[int] = []
    category: list[str] = []
    resident: set[int] = set()
    op_names: list[str] = []
    creates: list[tuple[int, ...]] = []
    reads: list[tuple[int, ...]] = []
    phase_of: list[str] = []  # per storage: "fw" or "bw"
    # per storage: Inductor's buffer-reuse key (dtype, exact bytes); None: an op's internal scratch
    reuse_key_of: list[tuple[torch.dtype, int] | None] = []

    def new_storage(t: torch.Tensor, phase: str) -> int:
        nbytes.append(allocation_bytes(int(t.untyped_storage().nbytes()), device))
        category.append("temporaries")
        phase_of.append(phase)
        reuse_key_of.append((t.dtype, int(t.untyped_storage().nbytes())))
        return len(nbytes) - 1

    fw_ids: dict[object, int] = {}
    fw_nodes: dict[str, tuple[int, ...]] = {}
    # Inductor's layout optimisation runs the convolutions, and so their backward, channels-last
    channels_last = lowering == "inductor" and optimizes_layout(fw)

    def fw_id(t: torch.Tensor, resident_category: str | None = None) -> int:
        key = storage_key(t.untyped_storage())
        if key not in fw_ids:
            fw_ids[key] = new_storage(t, "fw")
            if resident_category is not None:
                resident.add(fw_ids[key])
                category[fw_ids[key]] = resident_category
        return fw_ids[key]

    for node in fw.graph.nodes:
        tensors = _tensors(node.meta.get("val"))
        if node.op in ("placeholder", "get_attr"):
            role = step.roles.get(node.name, Role.BUFFER if node.op == "get_attr" else Role.INPUT)
            resident_category = _RESIDENT_CATEGORY.get(role, "inputs")
            fw_nodes[node.name] = tuple(fw_id(t, resident_category) for t in tensors)
        elif node.op == "call_function":
            before = len(nbytes)
            fw_nodes[node.name] = tuple(fw_id(t) for t in tensors)
            _add_scratch(node, device, nbytes, category, phase_of, reuse_key_of, "fw",
                         channels_last)
            if node.target is not operator.getitem:
                op_names.append(node.name)
                creates.append(tuple(range(before, len(nbytes))))
                reads.append(_reads(node, fw_nodes))
            elif len(nbytes) > before:  # a getitem whose storage its op did not list
                creates[-1] = creates[-1] + tuple(range(before, len(nbytes)))
    fw_out = fw.graph.output_node().args[0]
    user_outputs = {s for n in fw_out[:num_fwd_outputs] if isinstance(n, torch.fx.Node)
                    for s in fw_nodes[n.name]}
    backward_start = len(op_names)

    bw_ids: dict[object, int] = {}
    bw_nodes: dict[str, tuple[int, ...]] = {}
    for node in bw.graph.nodes:
        tensors = _tensors(node.meta.get("val"))
        if node.op == "placeholder":
            ids = []
            for t in tensors:
                key = storage_key(t.untyped_storage())
                if key in fw_ids:
                    ids.append(fw_ids[key])
                else:  # a tangent: made by autograd just before the backward
                    ids.append(new_storage(t, "bw"))
                    resident.add(ids[-1])
                bw_ids[key] = ids[-1]
            bw_nodes[node.name] = tuple(ids)
        elif node.op == "call_function":
            before = len(nbytes)
            ids = []
            for t in tensors:
                key = storage_key(t.untyped_storage())
                if node.target is operator.getitem or key in _input_keys(node):
                    ids.append(bw_ids[key] if key in bw_ids else new_storage(t, "bw"))
                else:
                    ids.append(new_storage(t, "bw"))
                bw_ids[key] = ids[-1]
            bw_nodes[node.name] = tuple(ids)
            _add_scratch(node, device, nbytes, category, phase_of, reuse_key_of, "bw",
                         channels_last)
            if node.target is not operator.getitem:
                op_names.append(node.name)
                creates.append(tuple(range(before, len(nbytes))))
                reads.append(_reads(node, bw_nodes))
            elif len(nbytes) > before:
                creates[-1] = creates[-1] + tuple(range(before, len(nbytes)))
    bw_out = bw.graph.output_node().args[0]
    grads = {s for n in bw_out if isinstance(n, torch.fx.Node) for s in bw_nodes[n.name]}

    if channels_last:
        backward_start = _add_layout_copies(fw, fw_nodes, op_names, creates, reads, backward_start,
                                            lambda s: _copy_storage(s, nbytes, category, phase_of,
                                                                    reuse_key_of))

    read_in_bw = {s for r in reads[backward_start:] for s in r}
    for s in range(len(nbytes)):
        if s in resident:
            continue
        if s in grads:
            category[s] = "gradients"
        elif s in user_outputs:
            category[s] = "outputs"
        elif phase_of[s] == "fw" and s in read_in_bw:
            category[s] = "saved activations"
    storages = StepStorages(
        op_names=tuple(op_names),
        creates=tuple(creates),
        reads=tuple(reads),
        nbytes=tuple(nbytes),
        category=tuple(category),
        resident=frozenset(resident),
        pinned=frozenset(user_outputs | grads),
        accumulates={},  # eager FX backward ops allocate their outputs; nothing accumulates in place
        backward_start=backward_start,
    )
    if lowering == "eager":
        return storages
    kinds = {**{("fw", k): v for k, v in lowering_kinds(fw, device).items()},
             **{("bw", k): v for k, v in lowering_kinds(bw, device).items()}}
    phases = ["fw" if i < backward_start else "bw" for i in range(len(op_names))]
    per_op = [kinds.get((phase, name), Lowered.EXTERN) for phase, name in zip(phases, op_names)]
    nodes = {**{("fw", n.name): n for n in fw.graph.nodes},
             **{("bw", n.name): n for n in bw.graph.nodes}}
    op_nodes = [nodes.get((phase, name)) for phase, name in zip(phases, op_names)]
    # node None: the channels-last copies' kernel, whose buffers Inductor allocates
    writes_out = [node is None or node.target in _OUT_EXTERNS for node in op_nodes]
    returns_tuple = [node is not None and isinstance(node.meta.get("val"), (tuple, list))
                     for node in op_nodes]
    lowered = lower_storages(storages, per_op)
    if channels_last:
        lowered = _channels_last_gradients(lowered, per_op, op_nodes, bw_nodes,
                                           {s for name in contiguous_values(fw)
                                            for s in fw_nodes.get(name, ())}, reuse_key_of)
    lowered = pool_buffers(lowered, per_op, reuse_key_of, writes_out, returns_tuple)
    return free_after_kernel_groups(lowered, per_op, device)


def _channels_last_gradients(storages: StepStorages, kinds, op_nodes, bw_nodes, contiguous,
                             reuse_key_of: list) -> StepStorages:
    """A gradient a convolution's backward reads, computed by a kernel in place of a forward value
    Inductor keeps contiguous (the activation the classifier's pooling reads): the kernel writes it
    there, contiguous, and a channels-last copy of it for the convolution, which reads the copy."""
    if not contiguous:
        return storages
    creates, reads = list(storages.creates), list(storages.reads)
    nbytes, category = list(storages.nbytes), list(storages.category)
    creator = {s: i for i, made in enumerate(creates) for s in made}
    copies: dict[int, int] = {}
    for i, node in enumerate(op_nodes):
        if node is None or node.target is not torch.ops.aten.convolution_backward.default:
            continue
        for arg in node.args[:2]:
            for s in bw_nodes.get(arg.name, ()) if isinstance(arg, torch.fx.Node) else ():
                j = creator.get(s)
                if j is None or kinds[j] is not Lowered.KERNEL or not any(
                        a in contiguous and nbytes[a] == nbytes[s]
                        for a in storages.accumulates.get(s, ())):
                    continue
                if s not in copies:
                    copies[s] = len(nbytes)
                    nbytes.append(nbytes[s])
                    category.append("temporaries")
                    reuse_key_of.append(reuse_key_of[s])
                    creates[j] = creates[j] + (copies[s],)
                reads[i] = tuple(sorted(copies.get(r, r) for r in reads[i]))
    if not copies:
        return storages
    return dataclasses.replace(storages, creates=tuple(creates), reads=tuple(reads),
                               nbytes=tuple(nbytes), category=tuple(category))


def _copy_storage(s: int, nbytes: list[int], category: list[str], phase_of: list[str],
                  reuse_key_of: list) -> int:
    nbytes.append(nbytes[s])
    category.append("temporaries")
    phase_of.append("fw")
    reuse_key_of.append(reuse_key_of[s])
    return len(nbytes) - 1


def _add_layout_copies(fw, fw_nodes, op_names, creates, reads, backward_start, copy) -> int:
    """Inductor's channels-last copies of the forward's convolution inputs: made by one kernel at
    the start of the forward, read by the convolutions and, in place of the original, by the
    backward (the forward saves the copy). Returns the new ``backward_start``."""
    copies: dict[int, int] = {}
    for name in channels_last_copies(fw, layout_optimized=True):
        original = fw_nodes[name][0]
        if original not in copies:  # two placeholders of one storage: one copy
            copies[original] = copy(original)
    if not copies:
        return backward_start
    convs = {n.name for n in fw.graph.nodes if n.target is torch.ops.aten.convolution.default}
    for i, name in enumerate(op_names):
        if i >= backward_start or name in convs:
            reads[i] = tuple(sorted({copies.get(s, s) for s in reads[i]}))
    op_names.insert(0, "channels_last_copies")
    creates.insert(0, tuple(copies.values()))
    reads.insert(0, tuple(sorted(copies)))
    return backward_start + 1


def _add_scratch(node, device, nbytes, category, phase_of, reuse_key_of, phase,
                 channels_last) -> None:
    """An op's internal scratch as a storage it creates and nothing reads (freed right after)."""
    scratch = scratch_bytes(node, device, channels_last=channels_last)
    if scratch:
        nbytes.append(allocation_bytes(scratch, device))
        category.append("temporaries")
        phase_of.append(phase)
        reuse_key_of.append(None)


def _input_keys(node: torch.fx.Node) -> set[object]:
    keys = set()
    for inp in node.all_input_nodes:
        for t in _tensors(inp.meta.get("val")):
            keys.add(storage_key(t.untyped_storage()))
    return keys


def _reads(node: torch.fx.Node, env: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(sorted({s for inp in node.all_input_nodes for s in env.get(inp.name, ())}))
