"""Graphs of one step, split by graph breaks, share one budget.

Through ``torch.compile``, a model whose forward breaks the graph (``torch._dynamo.graph_break()``,
a ``print``, data-dependent control flow) reaches the backend as several graphs, compiled one
after another during the first call: graph 1, then the code after the break, graph 2, ... The
step then runs ``fw1, fw2, ..., fwN, bwN, ..., bw1``, so while graph k runs, the other graphs hold

- their parameters, resident throughout;
- the activations the graphs before it saved for their backward (until their backward runs,
  after graph k's);
- the gradients of the graphs after it, made by their backward before graph k's.

Each graph is planned with what the others hold as context (:class:`~fxmem.planning.options.StepContext`),
so the plan of every graph -- and so every moment of the step -- leaves the other graphs' bytes
under the budget. The graphs before graph k are known (their plans); the graphs after it are not
yet compiled, so their parameters and gradients are counted as those of the whole model (the
module whose parameters include graph k's) less the graphs planned so far: conservative, and the
plan's report says so. TorchDynamo marks a graph that ends at a break
(``gm.compile_subgraph_reason.graph_break``); a step's session closes with its last graph.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
import threading
import warnings

import torch

from fxmem.budget import format_bytes
from fxmem.memory.simulation import Category
from fxmem.planning.options import StepContext

__all__ = ["StepSession", "session_for", "ends_at_break", "compiled_inside_eager_code",
           "warn_unguaranteed", "BudgetNotGuaranteedWarning"]

log = logging.getLogger(__name__)


def ends_at_break(gm: torch.fx.GraphModule) -> bool:
    """TorchDynamo compiled ``gm`` because the code broke the graph: more graphs follow."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    return bool(reason is not None and getattr(reason, "graph_break", False))


def _storage_bytes(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def _model_of(params: list[torch.nn.Parameter]) -> torch.nn.Module | None:
    """The live module with the most parameters among those holding one of ``params``: the
    model the graph belongs to (found through the garbage collector; None if none)."""
    ids = {id(p) for p in params}
    best, best_n = None, 0
    with warnings.catch_warnings():  # isinstance() on deprecated module objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.nn.Module):
                    continue
            except Exception:  # noqa: BLE001 - proxies that fail isinstance
                continue
            own = list(obj.parameters())
            if len(own) > best_n and any(id(p) in ids for p in own):
                best, best_n = obj, len(own)
    return best


@dataclasses.dataclass
class _Graph:
    params: dict[int, int]  # parameter storage -> bytes
    trainable: dict[int, int]
    saved: int  # bytes its forward leaves for its backward


class StepSession:
    """The graphs planned so far in a step split by graph breaks."""

    def __init__(self):
        self.graphs: list[_Graph] = []

    def context_for(self, example_inputs, limit: int, more: bool) -> tuple[StepContext, str]:
        """What the other graphs hold while the next graph runs, and a note for its report.
        ``limit``: the bytes the step may hold; ``more``: graphs follow this one, so a share of
        what is left is kept for the activations they will save (their parameters' share)."""
        params = [t for t in example_inputs if isinstance(t, torch.nn.Parameter)]
        own = _storage_bytes(params)
        model = _model_of(params)
        model_params = list(model.parameters()) if model is not None else params
        every = _storage_bytes(model_params)
        trainable = _storage_bytes([p for p in model_params if p.requires_grad])
        planned = set(own).union(*(g.params for g in self.graphs))
        others = sum(b for s, b in every.items() if s not in own)
        later_grads = sum(b for s, b in trainable.items() if s not in planned)
        saved = sum(g.saved for g in self.graphs)
        later = sum(b for s, b in every.items() if s not in planned)
        own_bytes = sum(own.values())
        reserve = 0
        if more and later:  # the graphs after it save activations too: keep them their share
            room = max(0, limit - others - saved - own_bytes - later_grads)
            reserve = room * later // (later + own_bytes)
        held = {Category.PARAMETERS: others, Category.SAVED: saved + reserve}
        note = (f"graph {len(self.graphs) + 1} of a step split by graph breaks: planned with "
                f"what the other graphs hold -- parameters {format_bytes(others)}, activations "
                f"saved by the {len(self.graphs)} graph(s) before it {format_bytes(saved)}, "
                f"gradients of parameters not in the graphs planned so far, during its backward, "
                f"{format_bytes(later_grads)}, and {format_bytes(reserve)} kept for the "
                f"activations the graphs after it will save (their share of the parameters; "
                f"they are not compiled yet, so the rest of the model counts, conservatively)")
        self._pending = _Graph(own, _storage_bytes([p for p in params if p.requires_grad]), 0)
        self._held_saved = saved + reserve
        return StepContext().plus(held, {Category.GRADIENTS: later_grads}), note

    def add(self, plan) -> None:
        """Record the plan of the graph :meth:`context_for` was last asked for."""
        timeline = plan.timeline
        end_of_forward = max(timeline.backward_start - 1, 0)
        graph = self._pending
        # its own: the breakdown also holds what the graphs before it saved (its context)
        graph.saved = int(timeline.breakdown(end_of_forward)[Category.SAVED]) - self._held_saved
        self.graphs.append(graph)
        log.info("graph %d of a split step planned: saves %s for its backward",
                 len(self.graphs), format_bytes(graph.saved))


_local = threading.local()


def session_for(gm: torch.fx.GraphModule) -> tuple[StepSession | None, bool]:
    """The open session ``gm`` belongs to (None for a graph that is a whole step), and whether
    ``gm`` closes it (the last graph of the step)."""
    session = getattr(_local, "session", None)
    more = ends_at_break(gm)
    if session is None and not more:
        return None, True
    if session is None:
        session = _local.session = StepSession()
    if not more:
        _local.session = None
    return session, not more


class BudgetNotGuaranteedWarning(UserWarning):
    """fxmem planned a graph but cannot guarantee the step's budget (the message says why)."""


def compiled_inside_eager_code() -> str | None:
    """Where TorchDynamo compiles a frame called from user code it runs eagerly -- a graph break
    inside a loop makes it skip the enclosing frame and compile the frames it calls one by one
    (each block of a model, say): the graph is then part of a step fxmem cannot see, and the
    text names the frame compiled and the eager code around it. None for a frame compiled as
    the whole call (or the graph after a break, whose session knows the graphs before it)."""
    frame = sys._getframe(1)
    chain = []
    while frame is not None:
        chain.append(frame)
        frame = frame.f_back
    chain.reverse()  # outermost first
    dynamo = [i for i, f in enumerate(chain) if _in_torch(f, "_dynamo/convert_frame.py")]
    wrappers = [i for i, f in enumerate(chain) if _in_torch(f, "_dynamo/eval_frame.py")]
    if not dynamo or not wrappers or wrappers[0] > dynamo[0]:
        return None
    between = [f for f in chain[max(i for i in wrappers if i < dynamo[0]) + 1:dynamo[0]]
               if "/torch/" not in f.f_code.co_filename.replace("\\", "/")]
    if not between:
        return None
    compiled = chain[dynamo[0]].f_locals.get("frame")
    name = (f"{compiled.f_code.co_name} ({compiled.f_code.co_filename}:"
            f"{compiled.f_code.co_firstlineno})") if hasattr(compiled, "f_code") else "a frame"
    around = between[-1]
    return (f"TorchDynamo compiled {name} on its own, called from "
            f"{around.f_code.co_name} ({around.f_code.co_filename}:{around.f_lineno}), which "
            "runs eagerly (a graph break inside a loop skips the enclosing frame)")


def _in_torch(frame, suffix: str) -> bool:
    return frame.f_code.co_filename.replace("\\", "/").endswith("torch/" + suffix)


def warn_unguaranteed(where: str) -> str:
    """Warn that the budget of a graph compiled inside eager code is not guaranteed; the note."""
    note = (f"{where}: this graph's plan cannot see what the code around it holds, so the "
            "step's peak may exceed the budget. Move the graph break out of the loop, compile "
            "with fullgraph=True, or use fxmem.optimize, which plans the step as one graph")
    warnings.warn(note, BudgetNotGuaranteedWarning, stacklevel=2)
    log.warning("%s", note)
    return note
