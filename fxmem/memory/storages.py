"""Adapter: FX graphs -> :class:`~fxmem.memory.simulation.StepStorages` (plain data): the one
storage table, for every graph fxmem simulates and every way of running it.

One builder serves the captured joint graph (what :func:`fxmem.estimate` and the recompute
problem read) and a plan's forward and backward graphs (what the planner checks): a step is a
sequence of graphs run one after the other, whose later graphs receive earlier graphs' values as
placeholders. How the graphs run is the ``lowering``:

- ``"autograd"``: eager PyTorch's own step as the autograd engine runs it (the ``make_fx``
  capture of :func:`fxmem.graph.capture.capture_step`): gradient accumulation (``a + b`` in the
  backward where ``a`` dies there) takes over ``a``'s storage;
- ``"eager"``: the graphs run as FX code (every op allocates its outputs);
- ``"inductor"``: as TorchInductor runs them -- the table is then rewritten by
  :func:`fxmem.memory.inductor.lower_table` (inlined values, channels-last copies, buffer pool,
  kernel groups).

Storage identity comes from the fake tensors the tracer recorded in ``node.meta["val"]``: an
op's output shares a storage with one of its inputs exactly when their fake tensors do (views,
in-place ops, ``detach``); otherwise it is a new storage. (A backward graph copies forward nodes
with their fake tensors, so a recomputed value is a new storage though its fake tensor is the
forward's.) A placeholder of a later graph whose fake tensor is an earlier graph's value is that
value (a saved activation); any other is resident (parameters, buffers, inputs, tangents).

Categories: resident storages by their role; a gradient output's storage is ``gradients``; a
storage a backward op makes is a temporary; a forward output the caller holds is ``outputs``; a
storage a forward op makes and a backward op reads is a ``saved activation``; the rest are
temporaries.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence

import torch
import torch.fx

from fxmem.memory.kernel_scratch import measured_scratch, measures
from fxmem.graph.capture import CapturedStep, Role
from fxmem.graph.ops import tensors, value_nbytes
from fxmem.graph.torch_compat import is_op_overload, storage_key
from fxmem.memory.simulation import Category, StepStorages

__all__ = ["LOWERINGS", "StorageTable", "build_table", "step_storages", "plan_storages",
           "allocation_bytes", "scratch_bytes"]

LOWERINGS = ("autograd", "eager", "inductor")
_CUDA_ROUND = 512  # the CUDA caching allocator rounds every block up to 512 bytes
_ACCUMULATING_OPS = {torch.ops.aten.add.Tensor}
_RESIDENT_CATEGORY = {
    Role.PARAMETER: Category.PARAMETERS,
    Role.BUFFER: Category.BUFFERS,
    Role.INPUT: Category.INPUTS,
    Role.TANGENT: Category.TEMPORARIES,
}


def check_lowering(lowering: str) -> str:
    """``lowering`` if it is one of :data:`LOWERINGS`, else a ValueError naming them."""
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")
    return lowering


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
    op they wrap. A microbatch's read of the whole batch's draws
    (:mod:`fxmem.passes.microbatch_draws`) unpacks a mask's bits a byte a value, on any device
    (counted for every read: a uniform or normal draw's, which copies, holds less). The CPU
    flash-attention kernels' blocks and accumulators, and reduced-precision matrix products' and
    convolutions' buffers, are measured once per shape (:mod:`fxmem.memory.kernel_scratch`)."""
    if node.op == "call_function" and is_op_overload(node.target) \
            and node.target._schema.name == "fxmem::microbatch_draw":
        return -(-math.prod(node.args[1]) // 8) * 8  # its part's bits, a byte each (padded)
    if device.type != "cpu" or node.op != "call_function":
        return 0
    target, args = node.target, node.args
    if not is_op_overload(target) and args and is_op_overload(args[0]):
        target, args = args[0], args[1:]  # run_and_save_rng_state(op, *args)
    elif not is_op_overload(target) and len(args) > 1 and is_op_overload(args[1]):
        target, args = args[1], args[2:]  # run_with_rng_state(state, op, *args)
    if target is node.target and measures(node):  # attention's blocks, oneDNN's packing
        return measured_scratch(node, device, channels_last=channels_last)
    if target is torch.ops.aten.convolution_backward.default and len(args) > 2:
        if channels_last:  # oneDNN works on channels-last tensors in place; it reorders the weight
            return 2 * value_nbytes(args[2])
        # oneDNN reorders the output gradient and the input into its blocked layouts
        return sum(value_nbytes(a) for a in args[:2])
    if target is not torch.ops.aten.native_dropout.default or not args:
        return 0
    train = args[2] if len(args) > 2 else node.kwargs.get("train", True)
    inp = args[0].meta.get("val") if isinstance(args[0], torch.fx.Node) else None
    if train is False or not isinstance(inp, torch.Tensor):
        return 0
    return inp.numel() * inp.element_size()


@dataclasses.dataclass(frozen=True)
class StorageTable:
    """The storages of a sequence of graphs, with what a lowering needs to rewrite them.

    ``op_nodes[i]`` is op ``i``'s node (``None`` for an op a lowering adds) and ``op_graph[i]``
    the index of its graph; ``graph_storages[g]`` maps graph ``g``'s node names to their storage
    ids; ``reuse_key[s]`` is storage ``s``'s buffer-reuse key (dtype, exact bytes; ``None`` for an
    op's internal scratch)."""

    storages: StepStorages
    graphs: tuple[torch.fx.GraphModule, ...]
    op_nodes: tuple[torch.fx.Node | None, ...]
    op_graph: tuple[int, ...]
    graph_storages: tuple[dict[str, tuple[int, ...]], ...]
    reuse_key: tuple[object, ...]
    device: torch.device


class _Builder:
    """Storages as the graphs' nodes create and read them, in order."""

    def __init__(self, device: torch.device, channels_last: bool):
        self.device, self.channels_last = device, channels_last
        self.nbytes: list[int] = []
        self.reuse_key: list[object] = []
        self.made_by: list[int | None] = []  # op index; None for resident storages
        self.resident: dict[int, str] = {}  # storage -> category
        self.known: dict[object, int] = {}  # storage key -> latest storage id with it
        self.op_nodes: list[torch.fx.Node] = []
        self.op_graph: list[int] = []
        self.creates: list[tuple[int, ...]] = []
        self.reads: list[tuple[int, ...]] = []

    def new(self, nbytes: int, key: object, op: int | None) -> int:
        self.nbytes.append(allocation_bytes(nbytes, self.device))
        self.reuse_key.append(key)
        self.made_by.append(op)
        return len(self.nbytes) - 1

    def tensor_storage(self, t: torch.Tensor, op: int | None, *, reuse: bool) -> int:
        """The storage of ``t``: the known one with its key when ``reuse``, else a new one."""
        key = storage_key(t.untyped_storage())
        if not (reuse and key in self.known):
            nbytes = int(t.untyped_storage().nbytes())
            self.known[key] = self.new(nbytes, (t.dtype, nbytes), op)
        return self.known[key]

    def placeholder(self, node: torch.fx.Node, category: str, first_graph: bool) -> tuple[int, ...]:
        val = node.meta.get("val")
        if node.op == "get_attr" and val is None:
            val = getattr(node.graph.owning_module, node.target)
        ids = []
        for t in tensors(val):
            seen = storage_key(t.untyped_storage()) in self.known
            s = self.tensor_storage(t, None, reuse=True)
            if not seen:  # a later graph's own placeholder: a tangent, made before it runs
                self.resident.setdefault(s, category if first_graph else Category.TEMPORARIES)
            ids.append(s)
        return tuple(ids)

    def op(self, node: torch.fx.Node, graph: int, env: dict[str, tuple[int, ...]]) -> None:
        index = len(self.op_nodes)
        before = len(self.nbytes)
        in_keys = {storage_key(t.untyped_storage())
                   for inp in node.all_input_nodes for t in tensors(inp.meta.get("val"))}
        env[node.name] = tuple(
            self.tensor_storage(t, index, reuse=storage_key(t.untyped_storage()) in in_keys)
            for t in tensors(node.meta.get("val")))
        scratch = scratch_bytes(node, self.device, channels_last=self.channels_last)
        if scratch:  # a storage of the op's own that nothing reads: freed right after it
            self.new(scratch, None, index)
        self.op_nodes.append(node)
        self.op_graph.append(graph)
        self.creates.append(tuple(range(before, len(self.nbytes))))
        self.reads.append(tuple(sorted({s for inp in node.all_input_nodes
                                        for s in env.get(inp.name, ())})))

    def getitem(self, node: torch.fx.Node, env: dict[str, tuple[int, ...]]) -> None:
        """A getitem names a storage of its op's tuple; one its op did not list is the op's."""
        before = len(self.nbytes)
        env[node.name] = tuple(self.tensor_storage(t, len(self.op_nodes) - 1, reuse=True)
                               for t in tensors(node.meta.get("val")))
        if len(self.nbytes) > before:
            self.creates[-1] = self.creates[-1] + tuple(range(before, len(self.nbytes)))


def build_table(
    graphs: Sequence[torch.fx.GraphModule],
    *,
    roles: dict[str, Role],
    is_backward: Callable[[int, torch.fx.Node], bool],
    held: Sequence[tuple[int, str]],
    gradients: Sequence[tuple[int, str]],
    device: torch.device,
    keep: Sequence[tuple[int, str]] = (),
    lowering: str = "eager",
    channels_last: bool = False,
) -> StorageTable:
    """The storage table of ``graphs`` run in order. ``roles`` gives each placeholder's role (by
    name; a later graph's placeholder that is no earlier value is a tangent);
    ``is_backward(g, node)`` tells the backward's ops; ``held`` are the forward outputs the caller
    holds (the loss among them) and ``gradients`` the gradient outputs, as (graph index, node
    name): both live to the end of the step, as do the values in ``keep``. ``channels_last``: convolutions run channels-last
    (:func:`scratch_bytes`). With ``lowering="autograd"`` a backward sum takes over a dying
    addend's storage, as the autograd engine accumulates gradients."""
    check_lowering(lowering)
    b = _Builder(device, channels_last)
    envs: list[dict[str, tuple[int, ...]]] = []
    backward_ops: set[int] = set()
    passed: list[tuple[int, set[int]]] = []  # per later graph: its last op, what it is passed
    for g, gm in enumerate(graphs):
        env: dict[str, tuple[int, ...]] = {}
        envs.append(env)
        made_before = len(b.nbytes)
        inputs: set[int] = set()
        first = len(b.op_nodes)
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                role = roles.get(node.name, Role.BUFFER if node.op == "get_attr" else Role.INPUT)
                env[node.name] = b.placeholder(node, _RESIDENT_CATEGORY.get(role, Category.INPUTS), g == 0)
                inputs.update(st for st in env[node.name]
                              if st < made_before and b.made_by[st] is not None)
            elif node.op == "call_function" and node.target is operator.getitem:
                b.getitem(node, env)
            elif node.op == "call_function":
                if is_backward(g, node):
                    backward_ops.add(len(b.op_nodes))
                b.op(node, g, env)
        if g and len(b.op_nodes) > first:
            passed.append((len(b.op_nodes) - 1, inputs))
    # what an earlier graph made and a later one is passed but does not read lives until that
    # graph ends: its arguments hold it (Inductor's ``call`` unpacks them and frees only what its
    # kernels read; a GraphModule's code holds its placeholders)
    for last, inputs in passed:
        graph = b.op_graph[last]
        read = {st for i, r in enumerate(b.reads) if b.op_graph[i] == graph for st in r}
        unread = inputs - read
        if unread:
            b.reads[last] = tuple(sorted(set(b.reads[last]) | unread))
    pinned = {s for g, name in [*held, *gradients, *keep] for s in envs[g][name]}
    storages = StepStorages(
        op_names=tuple(n.name for n in b.op_nodes),
        creates=tuple(b.creates),
        reads=tuple(b.reads),
        nbytes=tuple(b.nbytes),
        category=_categories(b, envs, held, gradients, backward_ops),
        resident=frozenset(b.resident),
        pinned=frozenset(pinned),
        accumulates=_accumulations(b, envs, backward_ops) if lowering == "autograd" else {},
        backward_start=min(backward_ops, default=len(b.op_nodes)),
        node_storages=envs[0] if len(envs) == 1 else {},
    )
    return StorageTable(storages, tuple(graphs), tuple(b.op_nodes), tuple(b.op_graph),
                        tuple(envs), tuple(b.reuse_key), device)


def _categories(b: _Builder, envs, held, gradients, backward_ops) -> tuple[str, ...]:
    grads = {s for g, name in gradients for s in envs[g][name]}
    outputs = {s for g, name in held for s in envs[g][name]}
    read_by_backward = {s for i in backward_ops for s in b.reads[i]}
    category = []
    for s, op in enumerate(b.made_by):
        if s in b.resident:
            category.append(b.resident[s])
        elif s in grads:
            category.append(Category.GRADIENTS)
        elif op in backward_ops:
            category.append(Category.TEMPORARIES)
        elif s in outputs:  # held by the caller whether or not the backward reads it
            category.append(Category.OUTPUTS)
        elif s in read_by_backward:
            category.append(Category.SAVED)
        else:
            category.append(Category.TEMPORARIES)
    return tuple(category)


def _accumulations(b: _Builder, envs, backward_ops) -> dict[int, tuple[int, ...]]:
    """Backward sums that may take over a dying addend's storage (the autograd engine's)."""
    accumulates = {}
    for i in sorted(backward_ops):
        node = b.op_nodes[i]
        if node.target in _ACCUMULATING_OPS and len(b.creates[i]) == 1:
            env = envs[b.op_graph[i]]
            inputs = [s for inp in node.all_input_nodes for s in env.get(inp.name, ())]
            accumulates[b.creates[i][0]] = tuple(s for s in inputs if s not in b.resident)
    return accumulates


def step_storages(step: CapturedStep, device: torch.device | None = None, *,
                  lowering: str = "autograd", channels_last: bool = False) -> StepStorages:
    """The storages a captured joint step creates, reads and keeps, in graph order
    (``lowering``: see the module's docstring; Inductor's rewrite is not applied here)."""
    return joint_table(step, device, lowering=lowering, channels_last=channels_last).storages


def joint_table(step: CapturedStep, device: torch.device | None = None, *,
                lowering: str = "autograd", channels_last: bool = False) -> StorageTable:
    """:func:`build_table` of a captured joint step."""
    return build_table(
        [step.gm], roles=step.roles, is_backward=lambda _, node: step.is_backward(node),
        held=[(0, n) for n in [step.loss_node, *step.held_outputs]],
        gradients=[(0, n) for n in step.grad_of], device=device or step.device,
        keep=[(0, n.name) for n in step.gm.graph.output_node().all_input_nodes],
        lowering=lowering, channels_last=channels_last)


def plan_table(step: CapturedStep, fw: torch.fx.GraphModule, bw: torch.fx.GraphModule, *,
               num_fwd_outputs: int, channels_last: bool = False) -> StorageTable:
    """:func:`build_table` of a plan's forward then backward graph, split from ``step``'s joint
    graph (for the roles): the forward's first ``num_fwd_outputs`` outputs are the caller's, the
    rest are saved for the backward; the backward's outputs are the gradients."""
    fw_out = fw.graph.output_node().args[0]
    bw_out = bw.graph.output_node().args[0]
    return build_table(
        [fw, bw], roles=step.roles, is_backward=lambda g, _: g == 1,
        held=[(0, n.name) for n in fw_out[:num_fwd_outputs] if isinstance(n, torch.fx.Node)],
        gradients=[(1, n.name) for n in bw_out if isinstance(n, torch.fx.Node)],
        device=step.device, lowering="eager", channels_last=channels_last)


def plan_storages(step: CapturedStep, fw: torch.fx.GraphModule, bw: torch.fx.GraphModule, *,
                  num_fwd_outputs: int, lowering: str = "eager") -> StepStorages:
    """Storages of a plan's forward then backward graph as they run with ``lowering`` ("eager"
    or "inductor")."""
    from fxmem.memory.inductor import optimizes_layout
    from fxmem.memory.lowering import lower_table

    if check_lowering(lowering) == "autograd":
        raise ValueError("a plan's graphs run as FX code or through Inductor, not autograd")
    channels_last = lowering == "inductor" and optimizes_layout(fw)
    table = plan_table(step, fw, bw, num_fwd_outputs=num_fwd_outputs, channels_last=channels_last)
    if lowering == "eager":
        return table.storages
    return lower_table(table, layout_optimized=channels_last).storages
