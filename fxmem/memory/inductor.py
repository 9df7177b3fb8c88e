"""What TorchInductor materialises: the memory model of a graph lowered through Inductor.

An FX graph run op by op allocates every op's output. Inductor does not: it lowers pointwise ops
(and gathers, pads, clones, casts) to loop bodies that are *inlined* into their consumers, so an
intermediate read only by other loop bodies never exists in memory -- the fused cross-entropy
never materialises the (tokens x vocabulary) log-softmax. What it does materialise:

- graph outputs (what the forward saves for the backward, the gradients);
- inputs of extern kernels and fallbacks (``mm``, convolutions, attention, random-op wrappers);
- outputs of reductions and of extern kernels;
- but not the inputs of a concatenation, computed into its output (``ConcatKernel``);
- a loop body read by more than one consumer when inlining it twice would be costly (Inductor's
  ``should_realize_on_reuse``: on CPU any body with ``exp``/``log``/``sigmoid``/``tanh``; more
  than ``realize_reads_threshold`` buffer reads or ``realize_opcount_threshold`` ops), or one
  that reads too many buffers (``has_exceeded_max_reads``). The thresholds are read from
  ``torch._inductor.config`` each time a graph is modelled, so a ``config.patch`` applies.

Inductor also writes a pointwise kernel's output into an input buffer that dies there (in-place
buffer reuse), which the memory model's take-over rule expresses -- only for an input the kernel
reads at the index it writes, in its dtype (``SchedulerNode.can_inplace``,
``can_match_buffer_size``; :func:`same_index_reads`): a transposing copy, such as the contiguous
clone of attention's permuted ``bmm`` output, gets a buffer of its own while its input is still
allocated. Nor does a kernel write into the output of a scatter (an embedding's gradient,
``index_put`` with accumulation): fused with it, the buffer is accessed at two indices, the
scattered write and the read (``single_index_in_fused_node``); the model assumes they fuse.

With convolutions, Inductor's layout optimisation (``GraphLowering.decide_layout_opt``; always on
the CPU with oneDNN) runs them channels-last: a graph input that a convolution reads in another
layout -- the images, every 3x3 weight -- is copied into a new channels-last buffer at the start
of the forward, and when the forward also saves that input for the backward it saves the copy,
which then lives until the backward's last read of it (:func:`channels_last_copies`).

On the CPU, Inductor's C++ backend emits the kernels between two extern calls as one function
(``CppScheduling``'s kernel group, flushed at the next extern kernel): the outputs of all of them
are allocated before it runs, and the inputs that die in any of them are freed after it
(:func:`kernel_groups`). A value recomputed for the next convolution's gradient, emitted in the
group of the previous block's batch-norm gradient, is allocated while that gradient's dying
inputs are still alive.

Layout optimisation makes channels-last only the convolutions and the values that lead to one or
follow one up to the last convolution (``GraphLowering.find_nodes_prefer_channels_last``); the
rest -- the activation the classifier's pooling reads -- stays contiguous
(:func:`contiguous_values`). A gradient for a convolution's backward that a kernel computes in
place of such a value (or of a gradient computed so) is written there and copied channels-last
for each convolution backward that reads it: a projection shortcut's block copies its output's
gradient twice (``fxmem.memory.lowering``).

Inductor's generated code pools buffers: a dead buffer is not freed if a later allocation of the
same dtype and size in the same graph can reuse it; it stays allocated until then
(:func:`pool_buffers`; ``codegen/wrapper.py``'s ``FreeIfNotReusedLine``/``AllocateLine``).

:func:`lowering_kinds` classifies a graph's ops; :func:`lower_storages` rewrites
:class:`~fxmem.memory.simulation.StepStorages` accordingly: an inlined op's storage costs nothing and
its readers read the op's inputs instead, so those live until the last consumer.
The rules follow ``torch/_inductor/graph.py`` (``run_node``) and ``ir.py`` (``StorageBox``); the
scheduler can remove a few more buffers (all readers fused into one kernel), which this model
does not, so it errs on the side of more memory.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import operator
from collections.abc import Sequence

import torch
import torch.fx

from fxmem.errors import TorchCompatError
from fxmem.graph import torch_compat
from fxmem.graph.ops import aliases_input, base_name, is_pointwise, is_view, tensors
from fxmem.memory.simulation import StepStorages

__all__ = ["Lowered", "lowering_kinds", "lower_storages", "channels_last_copies", "optimizes_layout",
           "pool_buffers", "is_fallback", "kernel_groups", "free_after_kernel_groups", "contiguous_values",
           "same_index_reads"]

log = logging.getLogger(__name__)

_HEAVY = {"exp", "exp2", "expm1", "log", "log10", "log1p", "log2", "sigmoid", "tanh",
          "_softmax", "_log_softmax", "gelu", "silu", "erf"}
_INLINABLE = {"gather", "index", "embedding", "constant_pad_nd", "clone", "_to_copy", "full",
              "full_like", "zeros_like", "ones_like", "scalar_tensor", "arange", "iota",
              "select_scatter", "slice_scatter", "convert_element_type", "where", "fill",
              "zeros", "ones", "lift_fresh_copy", "copy", "alias_copy", "expand_copy",
              "permute_copy", "view_copy"}
# inlinable ops whose element i is their input's element i (as a pointwise op's)
_SAME_INDEX = {"clone", "_to_copy", "convert_element_type", "lift_fresh_copy", "alias_copy"}
# ops Inductor lowers as a copy of their first argument that it then writes into (a scatter)
_COPY_THEN_SCATTER = {"index_put", "_unsafe_index_put", "_unsafe_masked_index_put_accumulate",
                      "scatter", "scatter_add", "scatter_reduce", "index_add", "index_copy",
                      "index_fill"}


class Lowered(str, enum.Enum):
    """How Inductor lowers an op."""

    INLINED = "inlined"  # a loop body inlined into its consumers: never in memory
    KERNEL = "kernel"  # a loop body realised into a buffer (may reuse a dying input's buffer)
    REDUCTION = "reduction"  # a reduction: its (smaller) output is a buffer
    EXTERN = "extern"  # an extern kernel or fallback: inputs and outputs are buffers
    VIEW = "view"  # no storage of its own


def _op_class(node: torch.fx.Node) -> Lowered:
    """The lowering of an op on its own (before looking at its users)."""
    target = node.target
    if not torch_compat.is_op_overload(target):
        return Lowered.EXTERN  # higher-order ops (RNG replay wrappers), Python callables
    if torch.Tag.inplace_view in target.tags or aliases_input(node):
        return Lowered.VIEW
    if (target in torch_compat.FALLBACKS() or target in torch_compat.NEEDS_REALIZED_INPUTS()
            or target not in torch_compat.LOWERINGS()):
        return Lowered.EXTERN
    if torch.Tag.reduction in target.tags:
        return Lowered.REDUCTION
    if torch.Tag.pointwise in target.tags or base_name(target) in _INLINABLE:
        return Lowered.INLINED
    return Lowered.KERNEL


@dataclasses.dataclass
class _Body:
    reads: set[str]  # realised values the inlined body reads
    ops: int
    heavy: bool


def lowering_kinds(gm: torch.fx.GraphModule, device: torch.device) -> dict[str, Lowered]:
    """How Inductor lowers each ``call_function`` node of ``gm`` (getitems excluded).

    A custom op is a fallback kernel that reads realised inputs: fxmem registers its fallback
    before Inductor lowers the graph (``torch_compat.register_custom_fallbacks``), so Inductor
    realises a value read by several of them once, in every process (left to Inductor, the
    first graph of a process that reads an op copies such a value for each of its nodes)."""
    # Inductor's thresholds, read from its config now (torch_compat.inductor_thresholds)
    limits = torch_compat.inductor_thresholds(device.type)
    kinds: dict[str, Lowered] = {}
    bodies: dict[str, _Body] = {}
    outputs = {n.name for n in gm.graph.output_node().all_input_nodes}

    def body_of(node: torch.fx.Node) -> _Body:
        """What reading ``node`` costs a consumer's loop body: itself if realised."""
        if node.name in bodies and kinds.get(node.name) in (Lowered.INLINED, Lowered.VIEW):
            return bodies[node.name]
        return _Body(reads={node.name}, ops=0, heavy=False)

    # each op's lowering on its own; an inlinable value is then realised -- or not -- when
    # Inductor lowers it (GraphLowering.run_node: a user that needs realised inputs, or reuse
    # by several users of a costly body), in graph order, so a body reads its inputs as they
    # were decided: a value realised for an extern consumer is a buffer to every later body
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is not operator.getitem:
            kinds[node.name] = _op_class(node)

    # realise inlinable values whose consumers cannot inline them (users through views)
    def consumers(node: torch.fx.Node) -> list[torch.fx.Node]:
        found = []
        for user in node.users:
            if user.op == "call_function" and kinds.get(user.name) is Lowered.VIEW:
                found.extend(consumers(user))
            else:
                found.append(user)
        return found

    for node in gm.graph.nodes:
        kind = kinds.get(node.name)
        if kind not in (Lowered.INLINED, Lowered.VIEW):
            continue
        parts = [body_of(inp) for inp in node.all_input_nodes]
        body = bodies[node.name] = _Body(
            reads=set().union(*(p.reads for p in parts)) if parts else set(),
            ops=sum(p.ops for p in parts) + (kind is Lowered.INLINED),
            heavy=any(p.heavy for p in parts) or base_name(node.target) in _HEAVY,
        )
        if kind is not Lowered.INLINED:
            continue
        users = consumers(node)
        must_realise = (
            node.name in outputs
            or any(u.op != "call_function" or u.target is operator.getitem
                   or kinds.get(u.name) in (Lowered.EXTERN, Lowered.KERNEL)
                   and not _computes_into_output(u, device) for u in users)
            or len(body.reads) > limits.max_reads
            or (len(set(users)) > 1 and ((device.type == "cpu" and body.heavy)
                                         or len(body.reads) > limits.reuse_reads
                                         or body.ops > limits.max_ops))
        )
        if must_realise:
            kinds[node.name] = Lowered.KERNEL
            bodies[node.name] = _Body(reads={node.name}, ops=0, heavy=False)
    return kinds


def _computes_into_output(node: torch.fx.Node, device: torch.device) -> bool:
    """``node`` is a concatenation, which Inductor's ``ConcatKernel`` makes by computing each
    input's loop body straight into its slice of the output (``realize_into``, a
    ``NonOwningLayout``): an input inlinable elsewhere gets no buffer of its own. (On the CPU a
    concatenation of int8/uint8 tensors is a fallback, whose inputs are realised.)"""
    if node.target is not torch.ops.aten.cat.default:
        return False
    dtypes = {t.dtype for t in tensors(node.meta.get("val"))}
    return not (device.type == "cpu" and dtypes <= {torch.int8, torch.uint8})


def lower_storages(storages: StepStorages, kinds: Sequence[Lowered], *,
                   unexpanded: frozenset[int] = frozenset(), from_op: int = 0,
                   inplace: Sequence[frozenset[int]] | None = None) -> StepStorages:
    """``storages`` as Inductor runs them, given each op's lowering (``kinds[i]`` for op ``i``).

    An inlined op creates nothing: readers of its storage read its inputs instead (transitively),
    so they live until the last consumer. A realised loop body may take over an input buffer of
    its size that dies there (Inductor's in-place buffer reuse): one of ``inplace[i]``, the
    storages op ``i`` reads at the index it writes (:func:`same_index_reads`); any input of its
    size when ``inplace`` is not given.

    ``unexpanded``: inlined storages that ops from ``from_op`` on read as themselves (each still
    created by its op, with 0 bytes) -- the values a recompute problem may choose to realise.
    """
    if len(kinds) != len(storages.op_names) or (inplace is not None
                                                 and len(inplace) != len(kinds)):
        raise ValueError("kinds (and inplace) need one entry per op")
    expand: dict[int, tuple[int, ...]] = {}  # inlined storage -> storages its body reads
    reads: list[tuple[int, ...]] = []
    creates: list[tuple[int, ...]] = []
    nbytes = list(storages.nbytes)
    for i, kind in enumerate(kinds):
        read = set()
        for s in storages.reads[i]:
            read.update((s,) if i >= from_op and s in unexpanded else expand.get(s, (s,)))
        reads.append(tuple(sorted(read)))
        created = storages.creates[i]
        if kind is Lowered.INLINED and not (set(created) & (storages.pinned | storages.resident)):
            for s in created:
                expand[s] = tuple(sorted(read))
                nbytes[s] = 0
            creates.append(tuple(s for s in created if s in unexpanded))
        else:
            creates.append(created)
    accumulates = dict(storages.accumulates)
    for i, kind in enumerate(kinds):
        if kind is Lowered.KERNEL:
            for s in creates[i]:
                accumulates[s] = tuple(accumulates.get(s, ())) + tuple(
                    r for r in reads[i] if r not in storages.resident
                    and (inplace is None or r in inplace[i]))
    return dataclasses.replace(storages, creates=tuple(creates), reads=tuple(reads),
                               nbytes=tuple(nbytes), accumulates=accumulates)


def _layout(val) -> tuple | None:
    """How a tensor value lies in its storage: shape, strides (0 where the size is 1), offset and
    dtype; ``None`` for anything else (a tuple, a symbolic shape)."""
    if not isinstance(val, torch.Tensor):
        return None
    shape, strides, offset = tuple(val.shape), tuple(val.stride()), val.storage_offset()
    if not all(isinstance(x, int) for x in (*shape, *strides, offset)):
        return None
    return shape, tuple(0 if n == 1 else st for n, st in zip(shape, strides)), offset, val.dtype


def _through_view(reads: set, base, view) -> set:
    """What a view of ``base`` (layouts) reads, from what ``base`` reads: a source laid out as
    ``base`` is (same strides) is read through the view at the view's strides, its offset
    shifted as the view shifts it; any other source's index is not the view's."""
    if base is None or view is None:
        return set()
    return {(m, (view[0], view[1], lay[2] - base[2] + view[2], view[3]))
            for m, lay in reads if lay[:2] == base[:2]}


def same_index_reads(gm: torch.fx.GraphModule,
                     kinds: dict[str, Lowered]) -> dict[str, frozenset[str]]:
    """For each realised loop body of ``gm`` (``kinds``: :func:`lowering_kinds`), the values it
    reads at the index it writes, in its dtype -- the dying inputs whose buffer Inductor may write
    it into (``SchedulerNode.can_inplace``: the read's index equals the write's;
    ``can_match_buffer_size``: the same dtype). The index is followed from the realised values
    (placeholders, kernel, reduction and extern outputs) through views (by their fake tensors'
    strides and offsets) and through same-shape operands of pointwise and copying bodies; a
    broadcast operand, a gather, a permuted or sliced read is at another index."""
    reads: dict[str, set] = {}  # node -> {(value, layout of the value's storage as read)}
    found: dict[str, frozenset[str]] = {}
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr", "call_function"):
            continue
        layout = _layout(node.meta.get("val"))
        own = {(node.name, layout)} if layout is not None else set()
        kind = kinds.get(node.name)
        parent = _first_node(node)
        if node.op == "call_function" and node.target is operator.getitem:
            base = _first_node(parent) if parent is not None and is_view(parent) else None
            reads[node.name] = own if base is None else _through_view(
                reads.get(base.name, set()), _layout(base.meta.get("val")), layout)
        elif kind is Lowered.VIEW:
            reads[node.name] = set() if parent is None else _through_view(
                reads.get(parent.name, set()), _layout(parent.meta.get("val")), layout)
        elif kind in (Lowered.INLINED, Lowered.KERNEL):
            body = _body_reads(node, reads, layout)
            if kind is Lowered.KERNEL:
                found[node.name] = frozenset(m for m, lay in body if lay == layout)
            if base_name(node.target) in _COPY_THEN_SCATTER:
                own = set()  # written at scattered indices: no consumer writes into it in place
            reads[node.name] = own | (body if kind is Lowered.INLINED else set())
        else:  # placeholders, reductions, extern kernels: buffers of their own
            reads[node.name] = own
    return found


def _body_reads(node: torch.fx.Node, reads: dict[str, set], layout) -> set:
    """What a loop body reads at its own index (see :func:`same_index_reads`): a view op (one
    whose fake tensor is no view of its input's, a kernel to :func:`lowering_kinds`) reads
    through itself; a pointwise or copying op, its same-shape operands; a copy it then scatters
    into, its first argument."""
    if layout is None:
        return set()
    name = base_name(node.target)
    if is_view(node):
        parent = _first_node(node)
        return set() if parent is None else _through_view(
            reads.get(parent.name, set()), _layout(parent.meta.get("val")), layout)
    if is_pointwise(node) or name in _SAME_INDEX:
        operands = node.all_input_nodes
    elif name in _COPY_THEN_SCATTER:
        operands = [n for n in node.args[:1] if isinstance(n, torch.fx.Node)]
    else:
        return set()
    body = set()
    for inp in operands:
        val = inp.meta.get("val")
        if isinstance(val, torch.Tensor) and tuple(val.shape) == layout[0]:
            body |= reads.get(inp.name, set())
    return body


def _first_node(node: torch.fx.Node) -> torch.fx.Node | None:
    """A node's first argument when it is a node (the input a view op's outputs view)."""
    arg = node.args[0] if node.args else None
    return arg if isinstance(arg, torch.fx.Node) else None


def optimizes_layout(gm: torch.fx.GraphModule) -> bool:
    """Whether Inductor runs ``gm``'s convolutions channels-last (``decide_layout_opt``)."""
    if not any(n.target is torch.ops.aten.convolution.default for n in gm.graph.nodes):
        return False
    decide_layout_opt = torch_compat.DECIDE_LAYOUT_OPT()  # outside the try: missing is an error
    try:
        return bool(decide_layout_opt(gm, is_inference=False))
    except Exception as exc:  # noqa: BLE001 - Inductor's heuristic on a graph it would not see
        log.debug("decide_layout_opt failed (%s); assuming channels-last copies", exc)
        return True  # the copies: the side of more memory


def channels_last_copies(gm: torch.fx.GraphModule, *, layout_optimized: bool | None = None
                         ) -> list[str]:
    """Placeholders of ``gm`` that Inductor copies into channels-last buffers.

    When Inductor optimises the layout of a graph with convolutions, each convolution requires
    channels-last input and weight; a graph input in another layout (a contiguous 4-d tensor
    whose channels are not already innermost, e.g. a 3x3 weight; 1x1 weights already are) gets
    a channels-last copy. So does one that ``gm`` returns (the forward saves it for the
    backward) and that leads to a convolution through other ops
    (``GraphLowering.find_nodes_prefer_channels_last``): Inductor gives such an output
    channels-last strides (``run_node``'s output layout) -- an fp32 3x3 weight the backward casts
    to bf16 again, where the forward's bf16 copy of it is not saved, is copied and saved so.
    ``layout_optimized``: :func:`optimizes_layout` of ``gm``, if the caller has decided it already.
    """
    if layout_optimized is None:
        layout_optimized = optimizes_layout(gm)
    if not layout_optimized:
        return []
    copied: list[str] = []
    for conv in (n for n in gm.graph.nodes if n.target is torch.ops.aten.convolution.default):
        for arg in conv.args[:2]:
            if not isinstance(arg, torch.fx.Node) or arg.op != "placeholder" or arg.name in copied:
                continue
            val = arg.meta.get("val")
            if (isinstance(val, torch.Tensor) and val.dim() == 4
                    and not val.is_contiguous(memory_format=torch.channels_last)):
                copied.append(arg.name)
    returned = set(gm.graph.output_node().all_input_nodes)
    saved = [n for n in gm.graph.nodes if n.op == "placeholder" and n in returned
             and n.name not in copied and isinstance(n.meta.get("val"), torch.Tensor)
             and n.meta["val"].dim() == 4 and n.meta["val"].is_contiguous()
             and not n.meta["val"].is_contiguous(memory_format=torch.channels_last)]
    if saved:
        try:  # called with a stand-in for GraphLowering: see torch_compat
            prefer = torch_compat.nodes_prefer_channels_last(gm)
        except TorchCompatError:
            raise
        except Exception as exc:  # noqa: BLE001 - Inductor's heuristic on a graph it would not see
            log.debug("find_nodes_prefer_channels_last failed (%s); assuming copies", exc)
            prefer = set(saved)  # the copies: the side of more memory
        copied.extend(n.name for n in saved if n in prefer)
    return copied


def pool_buffers(storages: StepStorages, kinds: Sequence[Lowered], keys_of: Sequence,
                 writes_out: Sequence[bool], returns_tuple: Sequence[bool],
                 fallback: Sequence[bool] | None = None,
                 device: torch.device | None = None) -> StepStorages:
    """``storages`` (already lowered) with Inductor's buffer pool.

    A buffer a graph makes and frees can be reused once dead, keyed by ``keys_of[s]`` (dtype and
    exact bytes, as ``buffer_reuse_key``; ``None`` for an op's internal scratch, which is not
    Inductor's). Not pooled: what the forward saves, an input of the backward freed there
    (``FreeLine``; see :func:`fxmem.memory.simulation.simulate`), and the outputs of an extern op that
    returns several tensors (``returns_tuple[i]``: ``convolution_backward``, the RNG-replay
    wrappers), views of its tuple to Inductor. A buffer is taken from the pool when Inductor
    allocates it: outputs of its own kernels, and of extern kernels it calls with ``out=``
    (``writes_out[i]`` for op ``i``).

    The pool's key holds the buffer's alignment: on the CPU Inductor takes every graph input as
    unaligned, and so the output of a fallback kernel (``fallback[i]``: a ``FallbackKernel``,
    such as a custom op) that reads one
    (:attr:`~fxmem.memory.simulation.StepStorages.unaligned`): no allocation reuses them, they
    are freed when they die. (Not what a kernel writes in place of one: it keeps its own name,
    which Inductor's ``buffer_reuse_key`` reads.)"""
    keys: dict[int, object] = {}
    recipients: set[int] = set()
    for i, created in enumerate(storages.creates):
        if returns_tuple[i] and kinds[i] is Lowered.EXTERN:
            continue
        for s in created:
            if s in storages.resident or keys_of[s] is None or storages.nbytes[s] == 0:
                continue
            keys[s] = keys_of[s]
            if kinds[i] in (Lowered.KERNEL, Lowered.REDUCTION) or writes_out[i]:
                recipients.add(s)
    if device is None or device.type != "cpu":
        return dataclasses.replace(storages, reuse_keys=keys,
                                   pool_recipients=frozenset(recipients))
    start = storages.backward_start
    forward_inputs = set(storages.resident)  # what the step is given: every graph's input
    backward_inputs = forward_inputs | {  # and what the forward made for the backward
        s for i in range(start) for s in storages.creates[i]} & {
        s for i in range(start, len(storages.creates)) for s in storages.reads[i]}
    unaligned: set[int] = set()
    for i, created in enumerate(storages.creates):
        inputs = forward_inputs if i < start else backward_inputs
        if fallback is not None and fallback[i] and not returns_tuple[i] and any(
                r in inputs or r in unaligned for r in storages.reads[i]):
            unaligned.update(created)
    return dataclasses.replace(storages, reuse_keys=keys, pool_recipients=frozenset(recipients),
                               unaligned=frozenset(unaligned))


def is_fallback(node: torch.fx.Node) -> bool:
    """Whether Inductor runs ``node``'s op as a ``FallbackKernel``: an op it has no lowering for
    (a custom op) or one it falls back to ATen for; not the extern kernels it calls itself
    (matrix products, convolutions) nor higher-order ops."""
    target = node.target
    return torch_compat.is_op_overload(target) and (
        target in torch_compat.FALLBACKS() or target not in torch_compat.LOWERINGS())


def kernel_groups(kinds: Sequence[Lowered], backward_start: int) -> tuple[int, ...]:
    """For each op, the last op of its kernel group: where what dies in it is freed on the CPU.

    Inductor's C++ backend emits the kernels between two extern calls (and no further than the end
    of a graph: ``backward_start`` separates the forward's ops from the backward's) as one
    function and frees what died in them after it. An extern kernel frees what dies there right
    after itself. For :attr:`~fxmem.memory.simulation.StepStorages.release_after`."""
    n = len(kinds)
    release = list(range(n))
    end = n - 1
    for i in range(n - 1, -1, -1):
        if i == backward_start - 1:
            end = i  # the forward's last group ends with the forward
        if kinds[i] is Lowered.EXTERN:
            end = i - 1  # the group before an extern kernel ends right before it
            continue
        release[i] = max(i, end)
    return tuple(release)


def free_after_kernel_groups(storages: StepStorages, kinds: Sequence[Lowered],
                             device: torch.device) -> StepStorages:
    """``storages`` (lowered, ``kinds[i]`` for op ``i``) with the frees of the C++ backend's kernel
    groups on the CPU (:func:`kernel_groups`); as they are on other devices, whose kernels free
    what dies in them one by one."""
    if device.type != "cpu":
        return storages
    return dataclasses.replace(storages,
                               release_after=kernel_groups(kinds, storages.backward_start))


def contiguous_values(gm: torch.fx.GraphModule) -> set[str]:
    """Nodes of ``gm`` (a graph whose layout Inductor optimises) with 4-d outputs that Inductor
    keeps contiguous: those outside ``GraphLowering.find_nodes_prefer_channels_last``."""
    try:  # called with a stand-in for GraphLowering: see torch_compat.nodes_prefer_channels_last
        channels_last = torch_compat.nodes_prefer_channels_last(gm)
    except TorchCompatError:
        raise
    except Exception as exc:  # noqa: BLE001 - Inductor's heuristic on a graph it would not see
        log.debug("find_nodes_prefer_channels_last failed (%s); assuming all channels-last", exc)
        return set()
    return {n.name for n in gm.graph.nodes if n.op == "call_function" and n not in channels_last
            and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 4}
