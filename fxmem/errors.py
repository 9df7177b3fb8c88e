"""The errors fxmem raises. Every one says what was wrong and what to do instead."""

from __future__ import annotations

__all__ = ["FxmemError", "CaptureError", "MicrobatchError", "StepInputError", "TorchCompatError"]


class FxmemError(Exception):
    """Base class of fxmem's own errors."""


class StepInputError(FxmemError, ValueError):
    """The model, its inputs or its output cannot make a training step (no loss, wrong device...)."""


class CaptureError(FxmemError, RuntimeError):
    """The training step cannot be captured as one graph.

    ``graph_breaks`` lists ``(reason, location)`` pairs when they could be found.
    """

    def __init__(self, message: str, graph_breaks: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.graph_breaks = list(graph_breaks or [])


class MicrobatchError(FxmemError, RuntimeError):
    """The step cannot be split into microbatches exactly (ops that mix samples, such as BatchNorm
    in training mode, or a loss that is not a mean or sum over the batch); the message names each
    op and its source line, and says how to accept per-microbatch semantics where that exists."""


class TorchCompatError(FxmemError, ImportError):
    """A torch internal fxmem relies on is missing from the installed torch (moved, renamed or
    removed by a torch release). The message names the internal, the installed torch version and
    the torch versions fxmem supports; :mod:`fxmem.graph.torch_compat` is the one place that
    reaches torch internals, so it is the one place to update."""
