"""Batch rules found wanting on real models: a concatenation with an empty cache, writes into a
view (T5's shifted labels), attention kernels, and a mixture-of-experts dispatch (rows sorted by
expert and put back), each kept apart where it keeps samples apart and caught where it mixes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxmem.graph.capture import capture_step
from fxmem.levers.microbatch.analysis import analyze_batch
from fxmem.levers.microbatch.runtime import run_microbatched, split_sizes


class Mixer(nn.Module):
    """A linear layer, then ``mix(h)`` on the (batch, features) activations, then a mean loss."""

    def __init__(self, mix):
        super().__init__()
        self.fc, self.mix = nn.Linear(6, 6), mix

    def forward(self, x):
        return self.mix(self.fc(x)).square().mean()


def _shifted(h):
    """T5's ``_shift_right``: writes into views of a zeros tensor."""
    out = h.new_zeros(h.shape)
    out[:, 1:] = h[:, :-1].clone()
    out[:, 0] = 1.0
    return out.masked_fill(out == -100, 0.0)


def _into_positions(h):
    base = torch.arange(36.0).view(6, 6).clone()  # varies along the batch, not from a sample
    base[:, :3] = h[:, :3]
    return base


def _attention(h, *, mask=None, across=False):
    q = h.view(1, 1, 6, 6) if across else h.view(6, 1, 2, 3)
    return F.scaled_dot_product_attention(q, q, q, attn_mask=mask).reshape(6, 6)


KEEP_APART = {
    "cat with an empty cache": lambda h: torch.cat([torch.tensor([]), h], -1),
    "cat with an empty slice": lambda h: torch.cat([h[:, :0], h, h.new_zeros(6, 0)], 1),
    "writes into views of zeros": _shifted,
    "attention per sample": _attention,
    "attention with a causal mask": lambda h: _attention(
        h, mask=torch.ones(2, 2, dtype=torch.bool).tril().expand(6, 1, 2, 2)),
}
MIX = {
    "cat with a per-position value": (lambda h: torch.cat([torch.arange(6.0)[:, None], h], 1),
                                      "batch_mixing"),
    "writes into a per-position value": (_into_positions, "batch_mixing"),
    "attention across the batch": (lambda h: _attention(h, across=True), "batch_mixing"),
    "a per-position attention mask": (lambda h: _attention(
        h, mask=torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 2, 2)), "batch_mixing"),
}


@pytest.mark.parametrize("mix", KEEP_APART.values(), ids=KEEP_APART.keys())
def test_keeps_samples_apart(mix):
    analysis = analyze_batch(capture_step(Mixer(mix), (torch.randn(6, 6),)))
    assert analysis.exact, analysis.reason


@pytest.mark.parametrize("mix,kind", MIX.values(), ids=MIX.keys())
def test_mixes_samples(mix, kind):
    analysis = analyze_batch(capture_step(Mixer(mix), (torch.randn(6, 6),)))
    assert kind in {c.kind for c in analysis.coupling} and not analysis.exact


class MiniMoE(nn.Module):
    """A mixture-of-experts layer as Hugging Face's ``grouped_mm`` experts run it; ``variant``
    "exact" puts the rows back with the sort's inverse, "sorted" leaves them in expert order,
    "perm" indexes them with the sort's positions instead of its inverse."""

    def __init__(self, variant, hidden=8, experts=4, k=2):
        super().__init__()
        pytest.importorskip("transformers.integrations.moe")  # registers its grouped matmul
        self.variant, self.k, self.experts = variant, k, experts
        self.router = nn.Linear(hidden, experts)
        self.w = nn.Parameter(torch.randn(experts, hidden, hidden) / hidden ** 0.5)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x, y):
        batch, seq, hidden = x.shape
        tokens = x.reshape(-1, hidden)
        weights, ids = self.router(tokens).softmax(-1).topk(self.k, dim=-1)
        weights, ids = weights.reshape(-1), ids.reshape(-1)
        ids_sorted, perm = torch.sort(ids)
        rows = tokens[perm // self.k]
        counts = torch.histc(ids_sorted.float(), bins=self.experts, min=0, max=self.experts - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        out = torch.ops.transformers.grouped_mm_fallback(rows, self.w, offsets)
        out = out * weights[perm].unsqueeze(-1)
        if self.variant == "exact":
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.size(0))
            out = out[inverse]
        elif self.variant == "perm":
            out = out[perm]
        h = out.view(-1, self.k, hidden).sum(1).view(batch, seq, hidden) + x
        return F.cross_entropy(self.head(h).flatten(0, 1), y.flatten())


def _moe_data(batch=5):
    torch.manual_seed(0)
    return torch.randn(batch, 3, 8), torch.randint(0, 3, (batch, 3))


def test_mixture_of_experts_dispatch_keeps_samples_apart_and_microbatches_exactly():
    x, y = _moe_data()
    model = MiniMoE("exact")
    analysis = analyze_batch(capture_step(model, (x, y)))
    assert analysis.exact, analysis.reason
    model(x, y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    params = list(model.parameters())
    loss, _ = run_microbatched(lambda a, b: (model(a, b),), [x, y], analysis=analysis,
                               sizes=split_sizes(5, 2), params=params)
    loss.backward()
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("variant", ["sorted", "perm"])
def test_mixture_of_experts_rows_left_out_of_order_mix_samples(variant):
    analysis = analyze_batch(capture_step(MiniMoE(variant), _moe_data()))
    assert not analysis.exact
    assert {"batch_mixing"} & {c.kind for c in analysis.coupling}, analysis.coupling


def test_sparse_csr_linear_keeps_samples_apart_and_microbatches_exactly():
    """The sparse lever's CSR product (``fxmem_sparse::csr_linear``) is a linear layer: each row of
    its input is multiplied alone, so a sparsified model still splits into microbatches (before,
    the analysis did not know the op and refused to split: the bench GPT's floor with every lever
    allowed stayed at the whole batch's)."""
    from fxmem.levers.sparse import sparsify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    sparsify(model, 0.5, kernel="csr")
    assert any(getattr(m, "kernel", None) == "csr" for m in model.modules())

    def step(x, y):
        return F.cross_entropy(model(x), y)

    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, y):
            return step(x, y)

    analysis = analyze_batch(capture_step(Step(), (x, y)))
    assert analysis.exact, analysis.reason
    step(x, y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss, _ = run_microbatched(lambda a, b: (step(a, b),), [x, y], analysis=analysis,
                               sizes=split_sizes(5, 2), params=params)
    loss.backward()
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g)
