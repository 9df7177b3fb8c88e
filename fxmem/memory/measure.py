"""Measure the peak bytes a piece of code holds on a device, by the budget's definition.

The quantity is the peak of the bytes held by tensors on the device while ``fn`` runs, counting
what was already live when it started (parameters, optimizer state, inputs...).

- CUDA: the caching allocator's statistics. ``torch.cuda.reset_peak_memory_stats`` before,
  ``torch.cuda.max_memory_allocated`` after; this is absolute (it includes the bytes allocated
  before ``fn``) and counts blocks as the allocator rounds them (multiples of 512 bytes).
- CPU: PyTorch's CPU allocator keeps no statistics, so the peak is reconstructed:
  the bytes live at the start (``baseline``; by default the storages of every CPU tensor reachable
  from Python, parameters' ``.grad`` included, found with the garbage collector) plus the maximum of
  the running sum of the profiler's allocation events (``torch.profiler`` with
  ``profile_memory=True`` records each allocation and free of the CPU allocator, Inductor's buffers
  included, as a ``[memory]`` event with a signed byte count).

Only the allocator's bytes count: memory that libraries allocate outside it (oneDNN scratch pads,
BLAS packing buffers, the Python heap) is not part of the budget and is not measured.
"""

from __future__ import annotations

import dataclasses
import gc
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from fxmem.graph import torch_compat

__all__ = ["MeasuredMemory", "measure_memory", "measure_peak", "live_tensor_bytes"]


@dataclasses.dataclass(frozen=True)
class MeasuredMemory:
    """What the allocator saw while ``fn`` ran.

    ``times_s``, ``live`` and ``allocated`` are the timeline: seconds since the start, the absolute
    bytes live after each allocation or free event, and the bytes allocated so far.
    """

    peak: int
    start: int
    end: int
    device: torch.device
    method: str
    times_s: np.ndarray
    live: np.ndarray
    allocated: np.ndarray
    result: Any = dataclasses.field(default=None, repr=False, compare=False)


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def measure_peak(
    fn: Callable[[], Any],
    *,
    device: torch.device | str | None = None,
    baseline: int | Iterable | None = None,
) -> int:
    """The absolute peak bytes held by tensors on ``device`` while ``fn()`` runs.

    ``device`` defaults to the current CUDA device when there is one, else the CPU. On the CPU,
    ``baseline`` sets the bytes live at the start: an int, or objects (tensors, modules,
    optimizers, containers of them) whose storages count; by default every CPU tensor reachable
    from Python. See :func:`measure_memory` for the timeline.
    """
    return measure_memory(fn, device=device, baseline=baseline).peak


def measure_memory(
    fn: Callable[[], Any],
    *,
    device: torch.device | str | None = None,
    baseline: int | Iterable | None = None,
) -> MeasuredMemory:
    """Run ``fn()`` once and return its peak, start and end bytes and the timeline of live bytes."""
    if not callable(fn):
        raise TypeError(f"measure_memory takes a callable, got {type(fn).__name__}")
    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda":
        return _measure_cuda(fn, device)
    if device.type != "cpu":
        raise ValueError(f"cannot measure memory on {device}: fxmem measures 'cpu' and 'cuda' devices")
    return _measure_cpu(fn, device, baseline)


_PROFILING = [0]  # profiles of ours running: the profiler does not nest


def profiling() -> bool:
    """A measurement of fxmem's is running (its profiler would be cut short by another)."""
    return _PROFILING[0] > 0


def _profile(fn, device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _PROFILING[0] += 1
    try:
        with profile(activities=activities, profile_memory=True) as prof:
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        _PROFILING[0] -= 1
    events = [
        (e.start_ns(), e.nbytes())
        for e in torch_compat.kineto_events(prof)
        if e.name() == "[memory]" and _event_on(e, device)
    ]
    events.sort()
    return result, events


def _event_on(event, device: torch.device) -> bool:
    kind = str(event.device_type()).rsplit(".", 1)[-1].lower()
    if kind != device.type:
        return False
    return device.type == "cpu" or device.index is None or event.device_index() == device.index


def _timeline(events, start: int) -> dict[str, np.ndarray]:
    if not events:
        return {"times_s": np.zeros(1), "live": np.array([start], dtype=np.int64),
                "allocated": np.zeros(1, dtype=np.int64)}
    t0 = events[0][0]
    times = np.array([(t - t0) / 1e9 for t, _ in events])
    deltas = np.array([b for _, b in events], dtype=np.int64)
    return {
        "times_s": np.concatenate([[0.0], times]),
        "live": np.concatenate([[start], start + np.cumsum(deltas)]),
        "allocated": np.concatenate([[0], np.cumsum(np.maximum(deltas, 0))]),
    }


def _measure_cpu(fn, device, baseline) -> MeasuredMemory:
    gc.collect()
    if baseline is None:
        start = live_tensor_bytes(device)
    elif isinstance(baseline, int):
        start = baseline
    else:
        start = live_tensor_bytes(device, roots=baseline)
    result, events = _profile(fn, device)
    timeline = _timeline(events, start)
    return MeasuredMemory(
        peak=int(timeline["live"].max()),
        start=start,
        end=int(timeline["live"][-1]),
        device=device,
        method="cpu: bytes live at start + max running sum of profiler [memory] events",
        result=result,
        **timeline,
    )


def _measure_cuda(fn, device) -> MeasuredMemory:
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    result, events = _profile(fn, device)
    peak = torch.cuda.max_memory_allocated(device)
    return MeasuredMemory(
        peak=int(peak),
        start=int(start),
        end=int(torch.cuda.memory_allocated(device)),
        device=device,
        method="cuda: torch.cuda.max_memory_allocated after reset_peak_memory_stats",
        result=result,
        **_timeline(events, start),
    )


def live_tensor_bytes(device: torch.device | str = "cpu", roots: Iterable | None = None) -> int:
    """Bytes of the distinct storages on ``device`` held by tensors.

    With ``roots``, only the tensors in them (tensors, modules, optimizers, mappings, sequences);
    without, every tensor the garbage collector can reach, and the ``.grad`` of each.
    """
    FakeTensor = torch_compat.FAKE_TENSOR()
    device = torch.device(device)
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if isinstance(t, FakeTensor) or t.device.type != device.type or t.is_sparse:
            return
        flatten = getattr(t, "__tensor_flatten__", None)
        if flatten is not None:  # a wrapper subclass (torchao's quantised optimizer state,
            for name in flatten()[0]:  # DTensor): its inner tensors hold the storages
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):  # DTensor also names its device mesh
                    add(inner)
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()

    def visit_tensor(t: torch.Tensor) -> None:
        add(t)
        if t.is_leaf and t.grad is not None:
            add(t.grad)

    if roots is None:
        with warnings.catch_warnings():  # isinstance() on deprecated module objects warns
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                try:
                    if isinstance(obj, torch.Tensor):
                        visit_tensor(obj)
                except Exception:  # exotic tensor subclasses without storage
                    continue
        return total

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            visit_tensor(x)
        elif isinstance(x, torch.nn.Module):
            for t in list(x.parameters()) + list(x.buffers()):
                visit_tensor(t)
        elif isinstance(x, torch.optim.Optimizer):
            for state in x.state.values():
                walk(state)
            for group in x.param_groups:  # Tensor hyper-parameters (torchao's lr), not params
                walk([v for k, v in group.items() if k != "params"])
        elif isinstance(x, Mapping):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                walk(v)

    walk(list(roots))
    return total
