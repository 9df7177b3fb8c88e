"""Predicted seconds of a whole planned step as it runs lowered: what the joint planner ranks by.

The roofline (:mod:`fxmem.cost.model`) prices every op of a graph as its own kernel at a device's
nominal rates. That is what the recompute solver needs (the relative cost of running a forward
op again), but it does not rank whole steps as a CPU runs them through Inductor: bf16 matrix
products there run about twice as fast as fp32's (a rate the default CPU spec does not have),
a product on half the rows is not half the time, a CSR product has no FLOP formula at all,
and Inductor fuses pointwise ops. :func:`step_seconds` therefore prices a step's forward and
backward graphs as follows (:class:`StepCosts` holds the constants):

- **Matrix products and the like** (every op with a FLOP formula: mm, addmm, bmm, attention,
  convolutions; and the sparse lever's CSR products): *measured* on the device, once per
  (op, input shapes, dtypes, strides, other arguments, torch's thread count) in the process
  (:func:`~fxmem.cost.op_timing.measured_seconds`; the best of a few calls on random inputs like
  the traced ones, the CSR products on a random pattern with the layer's non-zeros, a large
  matrix product on a slice of it: :mod:`fxmem.cost.op_timing`), so the rate is the one this
  device reaches at that shape and dtype. The first measurement of a signature is kept for the
  process: planning stays deterministic within it. Where an op cannot run (the meta device, an
  error), the roofline's time.
- **Indexing ops** (``index``, ``index_put``/``index_put_``, ``gather``, the masked
  accumulating index put of an embedding's backward; the sparse lever's transient dense weight
  is an accumulating ``index_put`` and its values' gradient an ``index``): Inductor lowers them
  to loops it fuses like pointwise ops (an accumulating put as atomic adds, without the sort
  ATen's kernel does), so with Inductor lowering they are priced as fused (below) -- except
  where Inductor's lowering falls back to the ATen kernel (:func:`inductor_falls_back`: a
  boolean index, an accumulation into int64 or bool, deterministic algorithms), and with eager
  lowering: there they are measured like the products, their indices random within the
  indexed sizes.
- **Other ops** (pointwise, reductions, copies, casts): with Inductor lowering, fused: the bytes
  they write at the spec's bandwidth (the inputs are read from the producer's kernel) and their
  random numbers, plus ``fused_op_s`` each; with eager lowering, the roofline (own kernel each).
- **A step split into k microbatches**: k times the first microbatch's graphs; plus, per
  microbatch, ``microbatch_s`` (the runtime loop: the graphs' calls through Dynamo and
  AOTAutograd, ``autograd.grad``, slicing the inputs) and ``draw_s`` per random op reading the
  whole batch's draws (``fxmem::microbatch_draw``: the cache's read and bookkeeping), and for
  each microbatch after the first the accumulation of the gradients (an ``add_`` over their
  bytes: read twice, written once).

The constants are from profiles of the bench GPT decoder through Inductor on the 2-core AMD EPYC
machines (1 torch thread): the microbatch loop's per-microbatch cost beyond its graphs' kernels
about 1.5 ms (Dynamo's guards, AOTAutograd's wrappers, copies of the inputs' parts), each draw
read about 0.3 ms (copies and bit shifts), and about 8 us per pointwise ATen op (what the fused
kernels' time grew by when the same graphs ran twice on half the batch: a kernel's fixed cost,
shared by the ops fused into it). Measuring the indexing ops under Inductor over-priced the
sparse lever's dense-kernel layers: at density 0.5 on the bench GPT decoder (bf16 compute, 2 x
128 tokens) its 16 accumulating puts measured 0.37 ms each on average (ATen's kernel sorts the
indices) and its 8 index reads 0.25 ms, 7.9 ms of a predicted 47 ms step, where the compiled
step's profile has no ATen indexing kernel and Inductor's fused kernels with the transient weight
(zero fill, scatter, cast) added 0.04-0.13 ms per layer to its product. Not priced: the
optimizer's step (the same for every plan of a step), cache effects between kernels.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable

import torch
from torch.fx.node import map_arg

from fxmem.cost.model import (DeviceSpec, _is_free, _random_time, _tensor_bytes, node_flops,
                              node_time, spec_for)
from fxmem.cost.op_timing import _INDEXING, _is_csr, measured_seconds
from fxmem.graph.ops import node_value, tensors

__all__ = ["StepCosts", "step_seconds", "node_step_seconds", "graph_device",
           "inductor_falls_back"]

aten = torch.ops.aten

_DRAW_OP = "microbatch_draw"


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """How :func:`step_seconds` prices a step (see the module's docstring). ``spec``: the
    device's roofline (None: :func:`~fxmem.cost.model.spec_for` the graph's device);
    ``measure``: time the matrix products on the device (False: the roofline's time);
    ``lowering``: "inductor" (pointwise ops fused) or "eager" (each op its own kernel)."""

    spec: DeviceSpec | None = None
    measure: bool = True
    lowering: str = "inductor"
    fused_op_s: float = 8e-6
    microbatch_s: float = 1.5e-3
    draw_s: float = 3e-4

    def __post_init__(self):
        if self.lowering not in ("inductor", "eager"):
            raise ValueError(f"lowering must be 'inductor' or 'eager', got {self.lowering!r}")
        if min(self.fused_op_s, self.microbatch_s, self.draw_s) < 0:
            raise ValueError("StepCosts' seconds must not be negative")


def _is_draw(node: torch.fx.Node) -> bool:
    name = getattr(getattr(node.target, "_schema", None), "name", "")
    return name == f"fxmem::{_DRAW_OP}"


def _dtype(value) -> torch.dtype | None:
    return value.dtype if isinstance(value, torch.Tensor) else None


def inductor_falls_back(node: torch.fx.Node) -> bool:
    """Whether Inductor runs indexing ``node`` as the ATen kernel (a fallback) rather than as a
    loop it fuses, by the rules of its lowerings (``torch/_inductor/lowering.py``: ``index``,
    ``index_put_impl_``, ``_unsafe_masked_index_put_accumulate``, ``gather``): a boolean (or
    uint8) index tensor -- except a put of one value at one boolean index, lowered as a masked
    fill --; an accumulating put into int64 or bool (no atomic add), or into bfloat16 on a CUDA
    device before compute capability 9.0; any put while deterministic algorithms are on. A gather
    is always lowered. False for other ops."""
    if node.target not in _INDEXING or node.target == aten.gather.default:
        return False
    args = map_arg(node.args, node_value)
    kwargs = map_arg(node.kwargs, node_value)
    masked = node.target == aten._unsafe_masked_index_put_accumulate.default
    at = 2 if masked else 1
    indices = args[at] if len(args) > at else kwargs.get("indices", ())
    if any(_dtype(i) in (torch.bool, torch.uint8) for i in indices or ()):
        if node.target == aten.index.Tensor:
            return True
        values = args[at + 1] if len(args) > at + 1 else kwargs.get("values")
        single = (len(indices) == 1 and isinstance(values, torch.Tensor)
                  and values.numel() == 1)
        return not single  # one value at one boolean index: a masked fill
    if node.target == aten.index.Tensor:
        return False
    if torch.are_deterministic_algorithms_enabled():
        return True
    accumulate = masked or bool(args[3] if len(args) > 3 else kwargs.get("accumulate", False))
    dtype = _dtype(args[0])
    if not accumulate:
        return False
    if dtype in (torch.int64, torch.bool):
        return True
    device = args[0].device if isinstance(args[0], torch.Tensor) else None
    return (dtype == torch.bfloat16 and device is not None and device.type == "cuda"
            and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) < (9, 0))


def node_step_seconds(node: torch.fx.Node, spec: DeviceSpec, costs: StepCosts) -> float:
    """Seconds ``node`` adds to a lowered step (see the module's docstring)."""
    if node.op != "call_function" or node.target is operator.getitem or _is_free(node):
        return 0.0
    if _is_draw(node):
        outs = tensors(node.meta.get("val"))
        numbers = outs[0].numel() if outs else 0
        read = sum(map(_tensor_bytes, outs)) / spec.bytes_per_s
        return costs.draw_s + read + (numbers / spec.random_per_s if spec.random_per_s else 0.0)
    indexing = node.target in _INDEXING and (costs.lowering == "eager"
                                             or inductor_falls_back(node))
    heavy = _is_csr(node) or indexing or node_flops(node) > 0
    if heavy:
        seconds = measured_seconds(node) if costs.measure else None
        return node_time(node, spec) if seconds is None else seconds
    if costs.lowering == "eager":
        return node_time(node, spec)
    written = sum(map(_tensor_bytes, tensors(node.meta.get("val"))))
    if written == 0 and not _random_time(node, spec):
        return 0.0
    return max(written / spec.bytes_per_s, _random_time(node, spec)) + costs.fused_op_s


def _gradient_bytes(backward: torch.fx.GraphModule) -> int:
    """Bytes of the tensors the backward graph returns (the gradients)."""
    out = next(n for n in backward.graph.nodes if n.op == "output")
    return sum(map(_tensor_bytes, tensors(map_arg(out.args, node_value))))


def step_seconds(graphs: Iterable[torch.fx.GraphModule], *, microbatches: int = 1,
                 costs: StepCosts = StepCosts(), spec: DeviceSpec | None = None) -> float:
    """Predicted seconds of a step whose forward and backward graphs (one microbatch's, the
    backward last) are ``graphs``, run ``microbatches`` times (see the module's docstring).
    ``spec``: overrides ``costs.spec``."""
    graphs = list(graphs)
    if not graphs:
        return 0.0
    spec = spec or costs.spec or spec_for(graph_device(graphs[0]))
    per = sum(node_step_seconds(n, spec, costs) for gm in graphs for n in gm.graph.nodes)
    k = max(1, int(microbatches))
    if k == 1:
        return per
    accumulate = 3 * _gradient_bytes(graphs[-1]) / spec.bytes_per_s
    return k * (per + costs.microbatch_s) + (k - 1) * accumulate


def graph_device(gm: torch.fx.GraphModule) -> torch.device:
    """The device of ``gm``'s first traced tensor value (the CPU when it has none)."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.device
    return torch.device("cpu")
