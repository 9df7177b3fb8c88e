"""A storage table as TorchInductor runs its graphs: the one place Inductor's memory rules
(:mod:`fxmem.memory.inductor`) are applied, for the recompute problem's joint graph and for a
plan's forward and backward graphs alike.

:func:`lower_table` rewrites a :class:`~fxmem.memory.storages.StorageTable` in this order:

1. the channels-last copies of the first graph's convolution inputs (images, 3x3 weights): made
   by one kernel at the start, read by the convolutions and, in place of the originals, by the
   backward (:func:`fxmem.memory.inductor.channels_last_copies`);
2. values Inductor inlines into their consumers cost nothing and their readers read their inputs
   (:func:`~fxmem.memory.inductor.lower_storages`; ``unexpanded`` values, from op ``from_op`` on,
   are read as themselves: the recompute problem's optional candidates); a realised loop body
   writes into a dying input only if it reads it at the index it writes (:func:`inplace_storages`);
3. a gradient a kernel computes in place of a value Inductor keeps contiguous (or of a
   gradient computed so) is copied channels-last for each convolution backward that reads it;
4. Inductor's buffer pool (:func:`~fxmem.memory.inductor.pool_buffers`), which on the CPU does
   not reuse unaligned buffers (graph inputs, and what is made in place of or from one by a
   fallback kernel);
5. on the CPU, the C++ backend frees what dies in a kernel group after the whole group.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from fxmem.memory.inductor import (
    Lowered,
    channels_last_copies,
    contiguous_values,
    free_after_kernel_groups,
    lower_storages,
    lowering_kinds,
    is_fallback,
    pool_buffers,
    same_index_reads,
)
from fxmem.memory.simulation import Category, StepStorages
from fxmem.memory.storages import StorageTable

__all__ = ["lower_table", "op_kinds", "inplace_storages", "COPIES_OP"]

COPIES_OP = "channels_last_copies"  # the op that makes the channels-last copies
# extern kernels Inductor calls with an ``out=`` buffer it allocated (so one its pool can supply)
_OUT_EXTERNS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.baddbmm.default}


def op_kinds(table: StorageTable) -> list[Lowered]:
    """How Inductor lowers each op of the table (an op a lowering added is an extern call)."""
    kinds = [lowering_kinds(gm, table.device) for gm in table.graphs]
    return [Lowered.EXTERN if node is None else kinds[g].get(node.name, Lowered.EXTERN)
            for node, g in zip(table.op_nodes, table.op_graph)]


def inplace_storages(table: StorageTable) -> list[frozenset[int]]:
    """For each op of the table, the storages its kernel reads at the index it writes: the ones
    Inductor may write its output into when they die there
    (:func:`fxmem.memory.inductor.same_index_reads`); none for an op a lowering added."""
    found = [same_index_reads(gm, lowering_kinds(gm, table.device)) for gm in table.graphs]
    return [frozenset() if node is None else frozenset(
        s for name in found[g].get(node.name, ()) for s in table.graph_storages[g].get(name, ()))
        for node, g in zip(table.op_nodes, table.op_graph)]


def lower_table(table: StorageTable, *, layout_optimized: bool,
                unexpanded: frozenset[int] = frozenset(), from_op: int = 0) -> StorageTable:
    """``table`` as Inductor runs its graphs (see the module's docstring). ``layout_optimized``:
    Inductor runs the convolutions channels-last (:func:`fxmem.memory.inductor.optimizes_layout`
    of the first graph); ``from_op`` counts ops of ``table`` (before any copies op is added)."""
    reuse_key = list(table.reuse_key)
    if layout_optimized:
        table = _with_layout_copies(table, reuse_key)
        from_op += table.op_nodes[0] is None
    kinds = op_kinds(table)
    storages = lower_storages(table.storages, kinds, unexpanded=unexpanded, from_op=from_op,
                              inplace=inplace_storages(table))
    if layout_optimized:
        storages = _channels_last_gradients(table, storages, kinds, reuse_key)
    writes_out = [node is None or node.target in _OUT_EXTERNS for node in table.op_nodes]
    returns_tuple = [node is not None and isinstance(node.meta.get("val"), (tuple, list))
                     for node in table.op_nodes]
    fallback = [node is not None and kinds[i] is Lowered.EXTERN and is_fallback(node)
                for i, node in enumerate(table.op_nodes)]
    storages = pool_buffers(storages, kinds, reuse_key, writes_out, returns_tuple, fallback,
                            table.device)
    storages = free_after_kernel_groups(storages, kinds, table.device)
    return dataclasses.replace(table, storages=storages, reuse_key=tuple(reuse_key))


def _with_layout_copies(table: StorageTable, reuse_key: list) -> StorageTable:
    """Inductor's channels-last copies of the first graph's convolution inputs: made by one
    kernel at the start of the forward, read by the convolutions and, in place of the original,
    by the backward (the forward saves the copy)."""
    first = table.graphs[0]
    storages = table.storages
    nbytes, category = list(storages.nbytes), list(storages.category)
    copies: dict[int, int] = {}
    for name in channels_last_copies(first, layout_optimized=True):
        original = table.graph_storages[0][name][0]
        if original not in copies:  # two placeholders of one storage: one copy
            copies[original] = len(nbytes)
            nbytes.append(nbytes[original])
            category.append(Category.TEMPORARIES)
            reuse_key.append(reuse_key[original])
    if not copies:
        return table
    convs = {n for n in first.graph.nodes if n.target is torch.ops.aten.convolution.default}
    reads = [tuple(sorted({copies.get(s, s) for s in read}))
             if i >= storages.backward_start or table.op_nodes[i] in convs else read
             for i, read in enumerate(storages.reads)]
    for copy in {c for read in reads[storages.backward_start:] for c in read} & set(copies.values()):
        category[copy] = Category.SAVED  # the forward saves the copy for the backward
    storages = dataclasses.replace(
        storages, op_names=(COPIES_OP, *storages.op_names),
        creates=(tuple(copies.values()), *storages.creates),
        reads=(tuple(sorted(copies)), *reads), nbytes=tuple(nbytes), category=tuple(category),
        backward_start=storages.backward_start + 1,
        release_after=tuple(r + 1 for r in (0, *storages.release_after))
        if storages.release_after else ())
    return dataclasses.replace(table, storages=storages, op_nodes=(None, *table.op_nodes),
                               op_graph=(0, *table.op_graph))


def _channels_last_gradients(table: StorageTable, storages: StepStorages, kinds,
                             reuse_key: list) -> StepStorages:
    """A gradient a convolution's backward reads, computed by a kernel in a contiguous layout: the
    kernel writes it contiguous and, for each convolution backward that reads it, a channels-last
    copy of its own, which that convolution reads.

    A kernel writes contiguous when it may write in place of a buffer of its size that is
    contiguous (it reads it at the index it writes): a forward value Inductor keeps contiguous
    (the activation the classifier's pooling reads) or, transitively, a backward value a kernel
    wrote in place of one -- the gradient of a residual sum whose first addend was computed in
    the pooled activation's buffer. Inductor fixes the layout of a value with several readers,
    one of them a ``convolution_backward``, to its strides (``GraphLowering.run_node``'s
    ``need_fixed_layout``), and each ``convolution_backward`` requires its own channels-last
    input (``ExternKernel.require_stride_order`` copies a fixed layout anew for every reader):
    the gradient of a block with a projection shortcut is read by two convolutions' backwards
    and copied twice, in the same kernel, before either runs."""
    contiguous = {s for name in contiguous_values(table.graphs[0])
                  for s in table.graph_storages[0].get(name, ())}
    if not contiguous:
        return storages
    creates, reads = list(storages.creates), list(storages.reads)
    nbytes, category = list(storages.nbytes), list(storages.category)
    for j, made in enumerate(creates):  # in op order: a kernel in place of a contiguous buffer
        if kinds[j] is Lowered.KERNEL:
            contiguous.update(s for s in made if any(
                a in contiguous and nbytes[a] == nbytes[s]
                for a in storages.accumulates.get(s, ())))
    creator = {s: i for i, made in enumerate(creates) for s in made}
    copies: dict[tuple[int, int], int] = {}  # (convolution backward, gradient) -> its copy
    for i, node in enumerate(table.op_nodes):
        if node is None or node.target is not torch.ops.aten.convolution_backward.default:
            continue
        env = table.graph_storages[table.op_graph[i]]
        for arg in node.args[:2]:
            for s in env.get(arg.name, ()) if isinstance(arg, torch.fx.Node) else ():
                j = creator.get(s)
                if j is None or kinds[j] is not Lowered.KERNEL or s not in contiguous \
                        or (i, s) in copies:
                    continue
                copies[i, s] = len(nbytes)
                nbytes.append(nbytes[s])
                category.append(Category.TEMPORARIES)
                reuse_key.append(reuse_key[s])
                creates[j] = creates[j] + (copies[i, s],)
                reads[i] = tuple(sorted(copies[i, s] if r == s else r for r in reads[i]))
    if not copies:
        return storages
    return dataclasses.replace(storages, creates=tuple(creates), reads=tuple(reads),
                               nbytes=tuple(nbytes), category=tuple(category))
