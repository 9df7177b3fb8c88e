"""The precision lever through the ``torch.compile`` backend: a Dynamo graph run under autocast.

``fxmem.optimize`` captures the step under ``torch.autocast``. A backend is handed a graph
TorchDynamo has already traced, so :func:`autocast_graph` marks the whole graph as an autocast
region instead -- the ``_enter_autocast`` / ``_exit_autocast`` nodes TorchDynamo itself records
for a ``with torch.autocast(...)`` block -- and AOTAutograd then builds the joint graph with the
casts, as it does for a user's own autocast region. :func:`tracing_with_casts` is the context the
joint graph is traced in (the lever's attention for the CPU,
:mod:`fxmem.levers.precision.attention`).

The graph's outputs keep the dtype autocast gives them, as in a user's own autocast forward: a
model that returns its logits returns them in bf16; a loss computed inside the graph is fp32
(the losses are on autocast's fp32 list). Only bf16 runs through the backend: fp16 needs loss
scaling around the backward, which the user's loop owns (use ``fxmem.optimize(...,
precision="fp16")``, or autocast and a ``torch.amp.GradScaler`` in your own code).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.fx

from fxmem.graph import torch_compat
from fxmem.levers.precision.attention import LowPrecisionAttention
from fxmem.levers.precision.casts import ComputeCasts

__all__ = ["autocast_graph", "tracing_with_casts", "backend_precision"]


def backend_precision(value) -> str | None:
    """The backend's ``precision`` option: None (bf16 only where the exact levers cannot meet
    the budget) or "bf16" (forced)."""
    if value is None or value in ("bf16", "bfloat16"):
        return None if value is None else "bf16"
    if value in ("fp16", "float16"):
        raise ValueError("precision='fp16' is not available through the torch.compile backend: "
                         "float16 needs loss scaling around the backward, which your loop owns. "
                         "Use fxmem.optimize(model, budget, allow=(..., 'precision'), "
                         "precision='fp16'), or torch.autocast and a torch.amp.GradScaler in your "
                         "own code (the backend then plans the casts it sees)")
    raise ValueError(f"precision must be None or 'bf16' through the backend, got {value!r}")


def autocast_graph(gm: torch.fx.GraphModule, casts: ComputeCasts) -> torch.fx.GraphModule:
    """A copy of the Dynamo graph ``gm`` whose body runs under ``torch.autocast(casts)``."""
    out = copy.copy(gm)  # a new module sharing gm's parameters, with its own graph
    graph = copy.deepcopy(gm.graph)
    out.graph = graph
    body = next((n for n in graph.nodes if n.op != "placeholder"), None)
    with graph.inserting_before(body):
        region = graph.call_function(torch_compat.ENTER_AUTOCAST(),
                                     (casts.device_type, casts.dtype, True, None))
    with graph.inserting_before(graph.output_node()):
        graph.call_function(torch_compat.EXIT_AUTOCAST(), (region,))
    graph.lint()
    out.recompile()
    return out


@contextlib.contextmanager
def tracing_with_casts(casts: ComputeCasts | None) -> Iterator[None]:
    """While AOTAutograd traces an autocast graph: the lever's CPU attention."""
    if casts is None:
        yield
        return
    with LowPrecisionAttention(casts.dtype):
        yield
