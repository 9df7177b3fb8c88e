"""Built-in example models (the bench's GPT and WideResNet) and the workload ``make demo`` runs.

``make demo`` calls ``fxmem estimate fxmem.examples:demo_workload``, which imports
this module, calls :func:`demo_workload` and predicts the memory of one training step
(forward, backward and an Adam update) of the small GPT it returns.  The model is small
enough that the demo runs in seconds on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from fxmem.examples.gpt import GPT, GPTConfig
from fxmem.examples.wide_resnet import WideResNet, wide_resnet_28_2

__all__ = ["GPT", "GPTConfig", "WideResNet", "demo_workload", "wide_resnet_28_2"]


def demo_workload() -> dict[str, Any]:
    """A small GPT (4 layers, d_model 256, 4 heads, vocab 4096) with Adam.

    Returns ``dict(model, args, kwargs, name, optimizer)``; ``model(*args)`` is the
    scalar loss of a batch of 8 random sequences of 128 tokens.
    """
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=4096, n_layer=4, n_head=4, d_model=256, max_seq_len=128)
    model = GPT(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (8, 128))
    targets = torch.randint(0, cfg.vocab_size, (8, 128))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return dict(model=model, args=(idx, targets), kwargs={}, name="demo", optimizer=optimizer)
