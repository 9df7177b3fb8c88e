"""Seconds per op of a captured graph: a roofline estimate, or a measurement on a device.

Roofline: ``max(FLOPs / FLOP rate, bytes read + written / bandwidth) + launch overhead``, FLOPs by
:mod:`torch.utils.flop_counter`'s formulas, bytes from the fake tensors in ``node.meta["val"]``
(so pointwise ops cost their memory traffic). Views, getitem and placeholders cost nothing."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import operator
import statistics
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch.fx.node import map_arg
from torch.utils.flop_counter import flop_registry

from fxmem.graph.ops import input_tensors, node_value, tensors
from fxmem.graph.torch_compat import is_op_overload, pytree
from fxmem.passes.rng_replay import is_random

__all__ = ["DeviceSpec", "H100", "cpu_spec", "calibrate", "spec_for", "node_flops", "node_bytes",
           "node_time", "graph_costs", "ProfiledCosts", "profile_costs"]

log = logging.getLogger(__name__)
aten = torch.ops.aten
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """A device's throughput: dense matmul FLOP/s per dtype, bytes/s, seconds per op launch, and
    random numbers generated per second (0: not a bound, as on GPUs, where Philox keeps up with
    memory)."""
    name: str
    flops_per_s: Mapping[torch.dtype, float]
    bytes_per_s: float
    op_overhead_s: float
    random_per_s: float = 0.0

    def __post_init__(self) -> None:
        if self.flops_per_s.get(torch.float32, 0) <= 0 or self.bytes_per_s <= 0:
            raise ValueError(f"DeviceSpec {self.name!r} needs positive fp32 FLOP/s and bytes/s")
        object.__setattr__(self, "flops_per_s", MappingProxyType(dict(self.flops_per_s)))

    def __hash__(self) -> int:
        return hash((self.name, frozenset(self.flops_per_s.items()), self.bytes_per_s,
                     self.random_per_s))

    def flops_rate(self, dtype: torch.dtype | None) -> float:
        """FLOP/s for ``dtype``; the float32 rate for a dtype the spec does not list."""
        return self.flops_per_s.get(dtype) or self.flops_per_s[torch.float32]


#: NVIDIA H100 SXM5 from the datasheet: dense (no sparsity), fp32 without TF32 tensor cores.
H100 = DeviceSpec("NVIDIA H100 SXM (datasheet)",
                  {torch.float32: 67e12, torch.bfloat16: 989e12, torch.float16: 989e12,
                   torch.float8_e4m3fn: 1979e12, torch.float8_e5m2: 1979e12},
                  bytes_per_s=3.35e12, op_overhead_s=5e-6)


def cpu_spec() -> DeviceSpec:
    """A modest default for a small (2-core) CPU: a default, not a measurement (see calibrate).
    Random numbers are slow on a CPU: a dropout mask of 4M elements takes about 20 ms on 2 cores,
    five times its memory traffic."""
    return DeviceSpec("cpu (default)", {torch.float32: 5e10}, bytes_per_s=1e10, op_overhead_s=2e-6,
                      random_per_s=2e8)


def _wall(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn``, with the device synchronized before and after (CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda _: None
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _best_time(fn: Callable[[], Any], device: torch.device, budget_s: float) -> float:
    """Fewest seconds of ``fn`` after a warm-up call, in 3 runs or more while ``budget_s`` lasts:
    the best, as a busy (shared) machine only ever adds time."""
    times, deadline = [_wall(fn, device)], time.perf_counter() + budget_s
    while len(times) < 4 or (time.perf_counter() < deadline and len(times) < 1000):
        times.append(_wall(fn, device))
    return min(times[1:])


def calibrate(device: torch.device | str, seconds: float = 1.0) -> DeviceSpec:
    """Measure ``device``: a square matmul's FLOP/s (fp32 and bf16; also fp16 on CUDA -- a CPU
    without fp16 matrix units runs it far slower than fp32, so its fp16 rate would mislead), a
    large copy's bytes/s (read + written) and a tiny in-place op's time, in about ``seconds``."""
    device = torch.device(device)
    if device.type == "meta" or seconds <= 0:
        raise ValueError(f"cannot calibrate {device} in {seconds} s")
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if cuda else ())
    flops: dict[torch.dtype, float] = {}
    for dtype in dtypes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        flops[dtype] = 2 * n**3 / _best_time(lambda: a @ b, device, 0.6 * seconds / len(dtypes))
    src = torch.randn((256 if cuda else 32) * 2**20, device=device)  # 1 GiB CUDA, 128 MiB CPU
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / _best_time(lambda: dst.copy_(src), device, 0.25 * seconds)
    x, k = torch.zeros(1, device=device), 100
    overhead = _best_time(lambda: [x.add_(1) for _ in range(k)], device, 0.1 * seconds) / k
    mask = torch.empty(2**20 if not cuda else 2**26, device=device)
    random = mask.numel() / _best_time(lambda: mask.bernoulli_(0.9), device, 0.05 * seconds)
    name = f"{torch.cuda.get_device_name(device) if cuda else device.type} (calibrated)"
    log.info("calibrated %s: %.3g fp32 FLOP/s, %.3g B/s, %.3g s per op, %.3g random numbers/s",
             name, flops[torch.float32], bandwidth, overhead, random)
    return DeviceSpec(name, flops, bandwidth, overhead, random)


def spec_for(device: torch.device | str) -> DeviceSpec:
    """The default spec for a device: :data:`H100` for CUDA, :func:`cpu_spec` otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "unavailable"
        if "H100" not in name:
            log.info("no spec for CUDA device %r: using H100's (calibrate() measures it)", name)
        return H100
    if device.type not in ("cpu", "meta"):
        log.info("no spec for %s: using the default CPU spec (calibrate() measures it)", device)
    return cpu_spec()


# The CPU attention kernels take the CUDA ones' leading arguments: the same formulas apply.
_FORMULA_OF = {getattr(aten, f"_scaled_dot_product_flash_attention_for_cpu{e}"):
               getattr(aten, f"_scaled_dot_product_flash_attention{e}") for e in ("", "_backward")}
# Ops reading only their inputs' metadata; allocating only; touching no data (or unmarked views).
_META_INPUTS = {aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like, aten.rand_like,
                aten.randn_like, aten.new_empty, aten.new_empty_strided, aten.new_zeros,
                aten.new_ones, aten.new_full}
_NO_WRITE = {aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty,
             aten.new_empty_strided}
_NO_DATA = {aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset,
            aten._assert_tensor_metadata, aten._unsafe_view}


def _packet(node: torch.fx.Node):
    target = node.target
    return target.overloadpacket if is_op_overload(target) else None


def _is_free(node: torch.fx.Node) -> bool:
    """No kernel: placeholders, outputs, getitem, views (all returns alias inputs, read-only)."""
    if node.op != "call_function" or node.target is operator.getitem:
        return True
    packet = _packet(node)
    if packet is None or packet in _NO_DATA:
        return packet is not None  # a Python function (e.g. on sizes) is not a view
    returns = node.target._schema.returns
    return bool(returns) and all(r.alias_info and not r.alias_info.is_write for r in returns)


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses: a broadcast (stride-0) dim counts once."""
    try:
        return int(math.prod(n for n, s in zip(t.shape, t.stride()) if s or not n)) * t.itemsize
    except Exception:  # sparse or nested tensors (no strides)
        return int(t.numel()) * t.itemsize


def node_flops(node: torch.fx.Node) -> int:
    """FLOPs of an ATen op by :mod:`torch.utils.flop_counter`'s formula; 0 for ops without one."""
    packet = _packet(node)  # the registry is read at each call: it sees later registrations
    formula = flop_registry.get(_FORMULA_OF.get(packet, packet))
    if formula is None:
        return 0
    args, kwargs = map_arg((node.args, node.kwargs), node_value)
    try:  # called as FlopCounterMode calls it: the op's arguments, and its output as out_val
        return int(formula(*args, **kwargs, out_val=node.meta.get("val")))
    except Exception as exc:
        log.debug("no FLOP count for %s (%s): %s", node.name, node.target, exc)
        return 0


def node_bytes(node: torch.fx.Node) -> int:
    """Bytes an op reads and writes (its input and output tensors); 0 for views and non-ops."""
    if _is_free(node):
        return 0
    packet = _packet(node)
    read = [] if packet in _META_INPUTS else input_tensors(node)
    written = [] if packet in _NO_WRITE else tensors(node.meta.get("val"))
    return sum(map(_tensor_bytes, read + written))


def node_time(node: torch.fx.Node, spec: DeviceSpec) -> float:
    """Roofline seconds, ``max(FLOPs / rate(dtype), bytes / bandwidth) + overhead``; 0.0 for
    placeholders, outputs, getitem, views and ops that touch no data."""
    if _is_free(node):
        return 0.0
    flops, nbytes = node_flops(node), node_bytes(node)
    if flops == 0 and nbytes == 0:
        return 0.0
    values = input_tensors(node) + tensors(node.meta.get("val"))  # the first float's dtype
    dtype = next((t.dtype for t in values if t.is_floating_point() or t.is_complex()), None)
    return max(flops / spec.flops_rate(dtype), nbytes / spec.bytes_per_s,
               _random_time(node, spec)) + spec.op_overhead_s


def compute_time(node: torch.fx.Node, spec: DeviceSpec) -> float:
    """Seconds of arithmetic alone (FLOPs / rate): an op fused into another kernel adds its
    arithmetic to that kernel, not its memory traffic or a launch."""
    if _is_free(node):
        return 0.0
    values = input_tensors(node) + tensors(node.meta.get("val"))
    dtype = next((t.dtype for t in values if t.is_floating_point() or t.is_complex()), None)
    return max(node_flops(node) / spec.flops_rate(dtype), _random_time(node, spec))


def _random_time(node: torch.fx.Node, spec: DeviceSpec) -> float:
    """Seconds to generate a random op's numbers (one per element of its first output)."""
    if not spec.random_per_s or not is_random(node):
        return 0.0
    outs = tensors(node.meta.get("val"))
    return outs[0].numel() / spec.random_per_s if outs else 0.0


def graph_costs(gm: torch.fx.GraphModule, spec: DeviceSpec) -> dict[str, float]:
    """Roofline seconds of every node of ``gm``, by node name."""
    return {node.name: node_time(node, spec) for node in gm.graph.nodes}


class ProfiledCosts(dict):
    """Node name -> seconds measured on a device. ``measured``: distinct (op, inputs) timed;
    ``reused``: nodes given a cached timing; ``fallbacks``: nodes given the roofline estimate."""
    def __init__(self) -> None:
        super().__init__()
        self.measured = 0
        self.reused = 0
        self.fallbacks: list[str] = []


def _signature(node: torch.fx.Node) -> tuple | None:
    """A hashable key of the op and its inputs' shapes, dtypes and strides; None if unknown."""
    def value(n: torch.fx.Node) -> Any:
        val = node_value(n)
        return _MISSING if val is None else val

    leaves, treespec = pytree.tree_flatten(map_arg((node.args, node.kwargs), value))
    key: list[Any] = [node.target, str(treespec)]
    for leaf in leaves:
        if leaf is _MISSING or isinstance(leaf, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return None
        tensor = isinstance(leaf, torch.Tensor)
        key.append((tuple(leaf.shape), leaf.dtype, leaf.stride()) if tensor else repr(leaf))
    return tuple(key)


def _materialize(t: Any, device: torch.device) -> Any:
    """A real tensor like ``t`` (shape, dtype, strides) on ``device``: random floats, int zeros.
    Devices become ``device``; other values stay."""
    if not isinstance(t, torch.Tensor):
        return device if isinstance(t, torch.device) else t
    size, stride = tuple(t.shape), tuple(t.stride())
    span = 0 if 0 in size else 1 + sum((s - 1) * st for s, st in zip(size, stride))
    if t.dtype.is_floating_point or t.dtype.is_complex:
        base = torch.randn(span, device=device, dtype=t.dtype if t.dtype.is_complex else None)
    else:
        base = torch.zeros(span, device=device, dtype=t.dtype)
    return base.to(t.dtype).as_strided(size, stride)


def _time_op(node: torch.fx.Node, device: torch.device, repeats: int) -> float | None:
    """Median wall seconds of the op on random inputs like its own; None when it cannot run."""
    try:
        with torch.no_grad():
            inputs = map_arg((node.args, node.kwargs), node_value)
            args, kwargs = pytree.tree_map(lambda x: _materialize(x, device), inputs)
            node.target(*args, **kwargs)  # warm-up, and the check that these inputs are valid
            times = [_wall(lambda: node.target(*args, **kwargs), device) for _ in range(repeats)]
        return statistics.median(times)
    except Exception as exc:  # invalid random inputs, out of memory, no kernel for the device
        log.debug("cannot time %s (%s) on %s: %s", node.name, node.target, device, exc)
        return None


def profile_costs(gm: torch.fx.GraphModule, device: torch.device | str,
                  repeats: int = 3) -> ProfiledCosts:
    """Seconds of every node of ``gm``, timed on ``device`` on random inputs like the traced ones:
    the median of ``repeats`` runs, each (op, input shapes/dtypes/strides, other arguments) once.
    An op that cannot run gets :func:`node_time` with ``spec_for(device)``; nodes that launch no
    kernel (views, getitem, placeholders, outputs, allocations) cost 0.0."""
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("cannot time ops on the meta device: use graph_costs(gm, spec)")
    spec, costs, cache = spec_for(device), ProfiledCosts(), {}
    repeats = max(1, repeats)
    nodes: Any = list(gm.graph.nodes)
    if len(nodes) > 200 and importlib.util.find_spec("tqdm") is not None:
        from tqdm import tqdm
        nodes = tqdm(nodes, desc="profiling ops", unit="op", leave=False)
    for node in nodes:
        estimate = node_time(node, spec)
        if estimate == 0.0:  # no kernel: views, getitem, allocations, arithmetic on sizes
            costs[node.name] = 0.0
            continue
        key, seconds = _signature(node), None
        if key is not None and key in cache:
            seconds = cache[key]
            costs.reused += seconds is not None
        elif key is not None:
            seconds = cache[key] = _time_op(node, device, repeats)
            costs.measured += seconds is not None
        if seconds is None:
            seconds = estimate
            costs.fallbacks.append(node.name)
        costs[node.name] = seconds
    log.debug("profiled %d nodes on %s: %d timed, %d reused, %d estimated", len(costs), device,
              costs.measured, costs.reused, len(costs.fallbacks))
    return costs
