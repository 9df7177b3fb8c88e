"""Run model code down the path ``torch.compile`` traces, outside TorchDynamo.

fxmem plans the step TorchDynamo captures, but it also runs the model itself on fake tensors
(the output's layout, the joint graph ``capture_step`` traces with ``make_fx`` for estimates and
the batch analysis). Libraries branch on whether they are being compiled: Hugging Face
transformers asks ``is_torchdynamo_compiling()`` (``torch.compiler.is_compiling()``) and, under
it, runs a mixture-of-experts layer through its own ``grouped_mm`` fallback instead of
``torch._grouped_mm``, whose fake kernel accepts only bf16. Every such run of fxmem's goes
through :func:`compiled_code_path`, so it sees the code the compiled step runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fxmem.graph import torch_compat

__all__ = ["compiled_code_path"]


@contextlib.contextmanager
def compiled_code_path() -> Iterator[None]:
    """``torch.compiler.is_compiling()`` (and ``torch._dynamo.is_compiling()``, which asks it)
    is True inside, as it is while TorchDynamo compiles a frame; the previous value is restored."""
    # what TorchDynamo itself enters for a compile (torch >= 2.11)
    with torch_compat.COMPILE_SESSION_CONTEXT()():
        yield
