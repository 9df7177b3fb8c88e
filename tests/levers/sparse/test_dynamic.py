"""Prune and regrow: nnz fixed, optimizer state moved with the values (zero for regrown weights,
kept for survivors), RigL regrows where the dense gradient is largest."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxmem.levers.sparse import sparsify
from fxmem.levers.sparse.regrow import random_free_positions


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                         nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3))


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _by_position(layer, tensor):
    """{flat position: value} of a tensor shaped like the layer's values."""
    return dict(zip(layer.indices.long().tolist(), tensor.tolist()))


def _train(model, opt, steps=3):
    x, y = _batch()
    for _ in range(steps):
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-1, momentum=0.9),
}


@pytest.mark.parametrize("method", ["set", "rigl"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_prune_regrow_keeps_nnz_and_moves_the_optimizer_state(method, optimizer):
    model = sparsify(_model(), 0.25)
    opt = OPTIMIZERS[optimizer](model.parameters())
    model.sparsity.attach(opt, every=2, method=method, fraction=0.4, loss_fn=_loss)
    _train(model, opt)
    layers = model.sparsity.layers
    before = {}
    for name, layer in layers.items():
        state = {k: _by_position(layer, v) for k, v in opt.state[layer.values].items()
                 if v.shape == layer.values.shape}
        assert state, "the optimizer keeps per-value state"
        before[name] = (layer.values, layer.nnz, _by_position(layer, layer.values.detach()), state)
    step_before = {n: opt.state[l.values].get("step") for n, l in layers.items()}
    assert model.sparsity.step(*_batch()) is None  # step 1 of every 2: nothing moves
    record = model.sparsity.step(*_batch())
    assert record is not None and record.fraction == 0.4
    for name, layer in layers.items():
        param, nnz, values, state = before[name]
        assert layer.values is param and layer.nnz == nnz  # same Parameter, same length
        idx = layer.indices.long()
        assert bool((idx[1:] > idx[:-1]).all())
        n_prune = round(0.4 * nnz)
        survivors = sorted(values, key=lambda p: abs(values[p]), reverse=True)[:nnz - n_prune]
        now = _by_position(layer, layer.values.detach())
        for key, old in state.items():
            new = _by_position(layer, opt.state[layer.values][key])
            for pos in now:
                expected = old[pos] if pos in survivors else 0.0  # kept, or regrown at zero
                assert new[pos] == expected, (key, pos)
        for pos in now:
            assert now[pos] == (values[pos] if pos in survivors else 0.0)
        assert set(now) >= set(survivors)
        update = next(u for u in record.layers if u.name == name)
        assert update.pruned == n_prune and update.nnz == nnz
        if step_before[name] is not None:
            assert torch.equal(opt.state[layer.values]["step"], step_before[name])
    _train(model, opt, 1)  # the optimizer steps on with the moved state


def test_rigl_regrows_where_the_masked_models_dense_gradient_is_largest():
    model = sparsify(_model(), 0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.sparsity.attach(opt, every=1, method="rigl", fraction=0.3, loss_fn=_loss)
    x, y = _batch()
    layers = model.sparsity.layers
    # the dense model with the same masked weights: its weight gradients score the positions
    dense = [(n, l, l.dense_weight().requires_grad_()) for n, l in layers.items()]
    h = x
    ref_model = list(model)
    for module in ref_model:
        match = [w for n, l, w in dense if l is module]
        h = F.linear(h, match[0], module.bias) if match else module(h)
    grads = torch.autograd.grad(F.cross_entropy(h, y), [w for _, _, w in dense])
    old = {n: (l.indices.long().clone(), l.values.detach().clone()) for n, l in layers.items()}
    rng = torch.random.get_rng_state()
    model.sparsity.step(x, y)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the scoring pass restores it
    assert all(p.grad is None for p in model.parameters())  # nor touches any .grad
    for (name, layer, _), g in zip(dense, grads):
        idx, vals = old[name]
        k = round(0.3 * idx.numel())
        keep = idx[torch.topk(vals.abs(), idx.numel() - k).indices]
        score = g.reshape(-1).abs().clone()
        score[keep] = -1
        grown = set(torch.topk(score, k).indices.tolist())
        assert set(layer.indices.long().tolist()) == set(keep.tolist()) | grown


def test_set_regrows_uniformly_at_free_positions_and_the_hook_runs_it():
    occupied = torch.tensor([0, 3, 4, 9])
    gen = torch.Generator().manual_seed(0)
    drawn = random_free_positions(12, occupied, 8, gen)
    assert sorted(drawn.tolist()) == [1, 2, 5, 6, 7, 8, 10, 11]
    with pytest.raises(ValueError, match="only 8 are free"):
        random_free_positions(12, occupied, 9, gen)
    model = sparsify(_model(), 0.25)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.sparsity.attach(opt, every=2, method="set", hook=True)
    before = {n: l.indices.clone() for n, l in model.sparsity.layers.items()}
    _train(model, opt, 2)  # optimizer.step() runs sparsity.step() after it
    assert model.sparsity.steps == 2 and len(model.sparsity.history) == 1
    assert any(not torch.equal(before[n], l.indices) for n, l in model.sparsity.layers.items())


def test_the_fraction_decays_as_a_cosine_and_updates_stop_at_until():
    model = sparsify(_model(), 0.25)
    s = model.sparsity.attach(None, every=10, method="set", fraction=0.3, until=100)
    assert s.prune_fraction(0) == pytest.approx(0.3)
    assert s.prune_fraction(50) == pytest.approx(0.15)
    assert s.prune_fraction(25) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert s.prune_fraction(100) == 0.0
    records = [s.step() for _ in range(120)]
    assert [r.step for r in records if r is not None] == list(range(10, 100, 10))
    static = sparsify(_model(), 0.25).sparsity.attach(None, every=1, method="static")
    assert static.step() is None and not static.history


def test_rigl_needs_a_batch():
    model = sparsify(_model(), 0.25)
    model.sparsity.attach(None, every=1, method="rigl")
    with pytest.raises(ValueError, match="batch"):
        model.sparsity.step()
    with pytest.raises(ValueError, match="hook=True"):
        model.sparsity.attach(torch.optim.SGD(model.parameters(), lr=0.1), hook=True)


def test_rigls_scoring_forward_leaves_batchnorm_statistics_as_they_were():
    import fxmem

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 4)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fxmem.sparsify(model, 0.5, optimizer=opt)
    model.sparsity.attach(opt, method="rigl", every=1,
                          loss_fn=lambda m, x, y: torch.nn.functional.cross_entropy(m(x), y))
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    model.sparsity.step(x, y)
    after = {k: v for k, v in model.state_dict().items() if k in before}
    for k in before:
        torch.testing.assert_close(after[k], before[k])
