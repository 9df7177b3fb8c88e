"""Built-in example models (the bench's GPT and WideResNet) and the workload ``make demo`` runs.

``make demo`` calls ``fxmem plan fxmem.examples:demo_workload --budget 60% --plot
demo_plan.png``, which imports this module, calls :func:`demo_workload` and fits one training
step (forward, backward and an Adam update) of the small GPT it returns under 60% of its
unoptimised peak: it prints the plan, the predicted and the measured peak, and plots the step's
memory before and after.  The model is small enough that the demo runs in well under a minute
on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from fxmem.examples.gpt import GPT, GPTConfig
from fxmem.examples.wide_resnet import WideResNet, wide_resnet_28_2

__all__ = ["GPT", "GPTConfig", "WideResNet", "demo_workload", "wide_resnet_28_2"]


def demo_workload(*, n_layer: int = 4, d_model: int = 256, n_head: int = 4,
                  vocab_size: int = 4096, batch: int = 8, seq: int = 128) -> dict[str, Any]:
    """A small GPT (by default 4 layers, d_model 256, 4 heads, vocab 4096) with Adam.

    Returns ``dict(model, args, kwargs, name, optimizer)``; ``model(*args)`` is the
    scalar loss of a batch of ``batch`` (8) random sequences of ``seq`` (128) tokens.
    The keywords make smaller versions (the tests' demo).
    """
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, d_model=d_model,
                    max_seq_len=seq)
    model = GPT(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    targets = torch.randint(0, cfg.vocab_size, (batch, seq))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return dict(model=model, args=(idx, targets), kwargs={}, name="demo", optimizer=optimizer)
