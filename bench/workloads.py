"""Benchmark workloads: one training step's model and inputs.

Every factory returns ``dict(model=..., args=..., kwargs=..., name=...)`` where
``model(*args, **kwargs)`` runs the forward pass and yields the scalar training loss
(for the Hugging Face model, an output object whose ``.loss`` is that scalar).  Each
factory calls ``torch.manual_seed(0)`` first, so weights and inputs are reproducible,
and returns the model in ``train()`` mode (dropout and batch-norm statistics active).

``gpt_decoder``
    The project's own :class:`fxmem.examples.GPT`: 6 layers, 8 heads, d_model 512,
    vocabulary 8192, context 256, dropout 0.1, tied embeddings (about 23M parameters).
    Inputs ``(idx, targets)``: random token ids of shape ``(batch, seq)``.

``wrn_28_2``
    WRN-28-2 (about 1.47M parameters) on random CIFAR-shaped images
    ``(batch, 3, 32, 32)``.  Inputs ``(x, targets)`` with 10 classes.  A convolutional
    workload whose memory is dominated by activations rather than weights.

``hf_gpt2``
    ``transformers.GPT2LMHeadModel`` with 4 layers, 4 heads, n_embd 256, context 256
    and the full 50257-token GPT-2 vocabulary (about 16M parameters, most of them in the
    tied embedding; the logits are the largest activation).  Inputs are passed as
    keyword arguments ``input_ids`` and ``labels`` (the same tensor; the model shifts
    labels internally), so ``model(**kwargs).loss`` is the loss.  ``use_cache=False``.
    The attention implementation is pinned to ``"sdpa"``: that is what transformers 5
    picks by default on CPU (and on GPU), so the benchmark measures what users get,
    and pinning it keeps the workload stable if that default changes.  With no padding
    mask GPT-2's SDPA path calls ``scaled_dot_product_attention(is_causal=True)``, the
    same pattern as ``gpt_decoder``; ``"eager"`` would instead materialise the
    ``(batch, heads, seq, seq)`` attention probabilities and their dropout mask.

``decoder_1b``
    A GPT-3-XL-shaped decoder (24 layers, d_model 2048, 16 heads, vocabulary 50257,
    context 2048, dropout 0.1, tied embeddings; about 1.32 billion parameters).  The
    model and its inputs are created under ``torch.device(device)``; with the default
    ``"meta"`` nothing is allocated, so it can be analysed on any machine.  It is not in
    :data:`WORKLOADS`, which holds only the workloads small enough to run on a CPU.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fxmem.examples import GPT, GPTConfig, WideResNet, wide_resnet_28_2

__all__ = ["gpt_decoder", "wrn_28_2", "hf_gpt2", "decoder_1b", "WORKLOADS"]


def gpt_decoder(batch: int = 8, seq: int = 256, *, n_layer: int = 6, d_model: int = 512,
                n_head: int = 8, vocab_size: int = 8192) -> dict[str, Any]:
    """GPT (6 layers, d_model 512, 8 heads, vocab 8192) on random tokens.

    The keywords make smaller versions (``bench/gpu_check.py --dry-run``)."""
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, d_model=d_model,
        max_seq_len=256, dropout=0.1
    )
    model = GPT(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    targets = torch.randint(0, cfg.vocab_size, (batch, seq))
    return dict(model=model, args=(idx, targets), kwargs={}, name="gpt_decoder")


def wrn_28_2(batch: int = 128, *, depth: int = 28, widen_factor: int = 2,
             image: int = 32) -> dict[str, Any]:
    """WRN-28-2 on random 3x32x32 images with 10 classes.

    The keywords make smaller versions, WRN-``depth``-``widen_factor`` on ``image`` x ``image``
    pixels (``bench/gpu_check.py --dry-run``)."""
    torch.manual_seed(0)
    if (depth, widen_factor) == (28, 2):
        model = wide_resnet_28_2(num_classes=10, in_channels=3).train()
    else:
        model = WideResNet(depth=depth, widen_factor=widen_factor, num_classes=10,
                           in_channels=3).train()
    x = torch.randn(batch, 3, image, image)
    targets = torch.randint(0, 10, (batch,))
    return dict(model=model, args=(x, targets), kwargs={}, name="wrn_28_2")


def hf_gpt2(batch: int = 8, seq: int = 256, *, n_layer: int = 4, n_embd: int = 256,
            n_head: int = 4, vocab_size: int = 50257) -> dict[str, Any]:
    """A 4-layer Hugging Face GPT-2 (n_embd 256, full vocabulary), SDPA attention.

    The keywords make smaller versions (``bench/gpu_check.py --dry-run``)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the hf_gpt2 workload needs Hugging Face transformers: "
            "pip install transformers  (or pip install 'fxmem[hf]')"
        ) from exc
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=256,
        vocab_size=vocab_size,
        bos_token_id=min(50256, vocab_size - 1),  # GPT-2's, or the last id of a smaller vocab
        eos_token_id=min(50256, vocab_size - 1),
        use_cache=False,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config).train()
    # GPT2LMHeadModel's class name matches no known loss type, so transformers logs a
    # warning and falls back to the causal-LM loss; name it explicitly (same loss).
    model.loss_type = "ForCausalLM"
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    return dict(
        model=model,
        args=(),
        kwargs=dict(input_ids=input_ids, labels=input_ids),
        name="hf_gpt2",
    )


def decoder_1b(
    batch: int = 1, seq: int = 2048, device: str | torch.device = "meta"
) -> dict[str, Any]:
    """A ~1.3B-parameter GPT built on ``device`` (``"meta"`` allocates nothing)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, n_layer=24, n_head=16, d_model=2048, max_seq_len=2048)
    with torch.device(device):
        model = GPT(cfg).train()
        idx = torch.randint(0, cfg.vocab_size, (batch, seq))
        targets = torch.randint(0, cfg.vocab_size, (batch, seq))
    return dict(model=model, args=(idx, targets), kwargs={}, name="decoder_1b")


WORKLOADS: dict[str, Callable[..., dict[str, Any]]] = {
    "gpt_decoder": gpt_decoder,
    "wrn_28_2": wrn_28_2,
    "hf_gpt2": hf_gpt2,
}
