"""Sparsifying a model whose optimizer exists; the least sparsity that meets a budget."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmem
from fxmem.levers.sparse import sparsify
from fxmem.levers.sparse.choice import least_sparsity
from tests.helpers import EAGER_RECOMPUTE


def test_an_existing_optimizer_is_pointed_at_the_values_with_the_kept_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    weight, bias = model[1].weight, model[1].bias
    old = {k: v.clone() for k, v in opt.state[weight].items()}
    bias_state = {k: v.clone() for k, v in opt.state[bias].items()}
    sparsify(model, 0.25, optimizer=opt)
    layer = model[1]
    assert layer.bias is bias  # the same Parameter, its state kept
    params = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is layer.values for p in params) and not any(p is weight for p in params)
    assert weight not in opt.state
    idx = layer.indices.long()
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[layer.values][key], old[key].reshape(-1)[idx])
    assert torch.equal(opt.state[layer.values]["step"], old["step"])
    for key, value in bias_state.items():
        assert torch.equal(opt.state[bias][key], value)
    assert model.sparsity.optimizer is opt
    F.cross_entropy(model(x), y).backward()
    opt.step()  # steps on


@pytest.mark.slow  # six plans (20 s on 2 busy cores)
def test_least_sparsity_is_the_largest_density_whose_floor_meets_the_budget(tiny_gpt):
    model, args, _ = tiny_gpt(n_layer=1, dropout=0.0)
    options = dict(time_limit=2, **EAGER_RECOMPUTE)
    sparse_floor = fxmem.floor(sparsify(tiny_gpt(n_layer=1, dropout=0.0)[0], 0.1), *args,
                               **options)
    half_floor = fxmem.floor(sparsify(tiny_gpt(n_layer=1, dropout=0.0)[0], 0.5), *args,
                             **options)
    assert sparse_floor < half_floor
    choice = least_sparsity(model, (sparse_floor + half_floor) // 2, args,
                            densities=(0.5, 0.1), **options)
    assert choice.density == 0.1 and choice.floors == {0.5: half_floor, 0.1: sparse_floor}
    assert not hasattr(model, "sparsity")  # the model itself is not changed
    assert least_sparsity(model, half_floor, args, densities=(0.5, 0.1), **options).density == 0.5
    with pytest.raises(fxmem.BudgetError) as err:
        least_sparsity(model, sparse_floor - 1, args, densities=(0.5, 0.1), **options)
    assert err.value.floor == sparse_floor
