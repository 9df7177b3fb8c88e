"""The sparse lever under a budget (``allow=(..., "sparse")``): used only when the other allowed
levers cannot meet the budget, at the least sparsity whose plan fits; the user's model and
optimizer untouched by a BudgetError, ``plan_for`` and ``fxmem.floor``."""

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmem
from fxmem.api.backend import options_from_mapping
from fxmem.budget import BudgetError
from fxmem.levers.base import REGISTRY, lever_for
from fxmem.levers.sparse import SparseLayer, SparseLever, sparse_layers, sparsity_report
from fxmem.levers.sparse.fallback import (DENSITIES, SparseFallback, _sparsify_in_place,
                                          check_sparse_density)
from fxmem.planning.options import PlanOptions
from tests.helpers import grads_of, make_tiny_gpt

OPTIONS = {"lowering": "eager", "time_limit": 2.0}
EXACT = ("recompute",)
SPARSE = ("recompute", "sparse")


def _gpt():
    """A one-block tiny GPT (dropout 0) and Adam: its four block Linears are eligible."""
    model, args, _ = make_tiny_gpt(n_layer=1, dropout=0.0)
    return model, args, torch.optim.Adam(model.parameters(), lr=1e-2)


def _snapshot(model, opt):
    """What must not change: the module objects, Parameter objects, param groups and state."""
    return ([(n, m) for n, m in model.named_modules()],
            [(n, p) for n, p in model.named_parameters()],
            [list(g["params"]) for g in opt.param_groups],
            {id(p): s for p, s in opt.state.items()}, "sparsity" in model.__dict__)


def _same(before, after):
    (mods0, params0, groups0, state0, sp0), (mods1, params1, groups1, state1, sp1) = before, after
    assert [n for n, _ in mods0] == [n for n, _ in mods1]
    assert all(a is b for (_, a), (_, b) in zip(mods0, mods1))
    assert all(a is b for (_, a), (_, b) in zip(params0, params1)) and len(params0) == len(params1)
    assert all(len(a) == len(b) and all(x is y for x, y in zip(a, b))
               for a, b in zip(groups0, groups1))
    assert state0.keys() == state1.keys() and all(state0[k] is state1[k] for k in state0)
    assert sp0 == sp1


@pytest.fixture(scope="module")
def floors():
    """(the floor with recomputation alone, the floor with sparse weights allowed too)."""
    model, args, opt = _gpt()
    before = _snapshot(model, opt)
    exact = fxmem.floor(model, *args, optimizer=opt, allow=EXACT, **OPTIONS)
    sparse = fxmem.floor(model, *args, optimizer=opt, allow=SPARSE, **OPTIONS)
    _same(before, _snapshot(model, opt))  # fxmem.floor leaves the model and optimizer as they were
    return exact, sparse


def test_fxmem_floor_with_sparse_allowed_is_lower(floors):
    exact, sparse = floors
    assert sparse < 0.9 * exact, floors


def test_sparse_is_a_registered_lossy_lever():
    assert lever_for("sparse") is SparseLever and not SparseLever.exact
    assert "sparse" in REGISTRY


# ---------------------------------------------------------------- end to end, tiny GPT
@pytest.mark.slow  # five plans (the other levers', three densities tried, the step's)
def test_a_budget_only_sparse_meets_trains_under_it_with_the_users_optimizer(floors):
    exact_floor, sparse_floor = floors
    model, args, opt = _gpt()
    budget = (exact_floor + sparse_floor) // 2
    om = fxmem.optimize(model, budget, optimizer=opt, allow=SPARSE, **OPTIONS)
    om(*args).backward()  # planned: the model is sparsified in place, opt rebound
    opt.step()
    opt.zero_grad()
    layers = sparse_layers(model)
    assert len(layers) == 4 and om.sparsity is model.sparsity
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(any(p is layer.values for p in params) for layer in layers.values())
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}  # no dense weight left
    plan = om.plan
    density = plan.sparsity.density
    assert round(density, 2) in DENSITIES[1:]  # 0.5 does not fit: between the two floors
    report = plan.report()
    assert f"sparse (density {density:.3f})" in report and "lossy: sparse weights" in report
    assert "sparse / dense" in report and "blocks.0.mlp.fc" in report
    assert any("Used because the budget" in n and "Lossy" in n for n in plan.notes)

    # the user's optimizer steps the values; each step's measured peak is within the budget
    before = {n: layer.values.detach().clone() for n, layer in layers.items()}

    def step():
        om(*args).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        peak = fxmem.measure_memory(step, device="cpu", baseline=[model, opt, list(args)]).peak
        assert peak <= budget, (peak, budget, plan.report())
    assert plan.predicted_peak == pytest.approx(peak, rel=0.01)
    assert all(not torch.equal(before[n], layer.values) for n, layer in layers.items())
    assert len(om.plans) == 1  # planned once

    # the sparse step's loss and gradients are the masked dense model's
    dense = fxmem.to_dense(model)
    loss, grads = grads_of(model, om, *args)
    dense_loss, dense_grads = grads_of(dense, dense, *args)
    torch.testing.assert_close(loss, dense_loss)
    dense_grad = dict(zip([n for n, _ in dense.named_parameters()], dense_grads))
    for (name, _), g in zip(model.named_parameters(), grads):
        if name.endswith(".values"):
            layer = layers[name.removesuffix(".values")]
            expected = dense_grad[name.removesuffix("values") + "weight"].reshape(-1)
            torch.testing.assert_close(g, expected[layer.indices.long()])
        else:
            torch.testing.assert_close(g, dense_grad[name])


def test_a_budget_the_exact_levers_meet_leaves_the_model_dense(floors):
    model, args, opt = _gpt()
    before = _snapshot(model, opt)
    om = fxmem.optimize(model, int(1.3 * floors[0]), optimizer=opt, allow=SPARSE, **OPTIONS)
    om(*args).backward()
    _same(before, _snapshot(model, opt))
    assert om.plan.sparsity is None and "sparse" not in om.plan.report().split("levers used")[1] \
        .splitlines()[0]


def test_a_budget_even_sparse_cannot_meet_has_the_lowest_floor_and_leaves_the_model(floors):
    exact_floor, sparse_floor = floors
    model, args, opt = _gpt()
    before = _snapshot(model, opt)
    om = fxmem.optimize(model, sparse_floor // 2, optimizer=opt, allow=SPARSE, **OPTIONS)
    with pytest.raises(BudgetError) as err:
        om(*args)
    # each layer's kernel (sparse product or transient dense weight) is the faster one timed on
    # this machine, so two searches may pick differently: their floors agree within 2%
    assert err.value.floor == pytest.approx(sparse_floor, rel=0.02) and sparse_floor < exact_floor
    assert "sparse lever" in str(err.value) and err.value.unoptimized is not None
    _same(before, _snapshot(model, opt))
    assert not om.plans


@pytest.mark.slow  # four plans
def test_plan_for_a_budget_only_sparse_meets_plans_it_and_leaves_the_model(floors):
    exact_floor, sparse_floor = floors
    model, args, opt = _gpt()
    before = _snapshot(model, opt)
    budget = (exact_floor + sparse_floor) // 2
    plan = fxmem.optimize(model, budget, optimizer=opt, allow=SPARSE, **OPTIONS).plan_for(*args)
    assert plan.predicted_peak <= budget and plan.sparsity is not None
    assert any(n.startswith("sparse:") for n in plan.notes)
    _same(before, _snapshot(model, opt))


def test_sparse_density_forces_a_density_whatever_the_budget():
    model, args, opt = _gpt()
    om = fxmem.optimize(model, 2**40, optimizer=opt, allow=SPARSE, sparse_density=0.5, **OPTIONS)
    om(*args).backward()
    opt.step()  # the values step
    assert len(sparse_layers(model)) == 4
    assert om.plan.sparsity.density == pytest.approx(0.5, abs=0.01)
    assert any("Forced by sparse_density=0.5" in n for n in om.plan.notes)
    # another input signature plans the sparse model as it is (not sparsified again)
    layers = dict(sparse_layers(model))
    om(args[0][:2], args[1][:2]).backward()
    assert sparse_layers(model) == layers and len(om.plans) == 2
    assert om.plan.sparsity is not None


@pytest.mark.parametrize("density", [0, 0.0, 1, 1.0, 1.5, -0.1, float("nan")])
def test_sparse_density_out_of_range_is_a_clear_error(density):
    model, _, _ = _gpt()
    with pytest.raises(ValueError, match=r"sparse_density must be in \(0, 1\)"):
        fxmem.optimize(model, "1GiB", allow=SPARSE, sparse_density=density)


def test_sparse_density_needs_the_lever_allowed_and_a_number():
    model, _, _ = _gpt()
    with pytest.raises(ValueError, match=r"allow=\(\.\.\., 'sparse'\)"):
        fxmem.optimize(model, "1GiB", allow=EXACT, sparse_density=0.1)
    with pytest.raises(TypeError, match="sparse_density must be a number"):
        fxmem.optimize(model, "1GiB", allow=SPARSE, sparse_density="0.1")
    assert check_sparse_density(None, frozenset()) is None


def test_the_torch_compile_backend_refuses_sparse():
    with pytest.raises(ValueError, match="sparse lever cannot run through the torch.compile "
                                         "backend.*fxmem.optimize.*fxmem.sparsify"):
        options_from_mapping({"budget": "1GiB", "allow": ("recompute", "sparse")})


# ---------------------------------------------------------------- the search, on plain numbers
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


class _Module:
    """Stands for an OptimizedModule: its plan's floor is ``floor_of(density)`` of the model as
    it is when planned (None: dense)."""

    def __init__(self, budget, floor_of, allow=SPARSE):
        self.module = _mlp()
        self.optimizer = torch.optim.Adam(self.module.parameters())
        F.mse_loss(self.module(torch.randn(2, 16)), torch.zeros(2, 4)).backward()
        self.optimizer.step()  # state to move and put back
        self._options = PlanOptions(budget=budget, allow=allow)
        self._compiled, self._last = {}, None
        self.floor_of, self.planned = floor_of, []
        self.fallback = SparseFallback()

    def density(self):
        layers = sparse_layers(self.module).values()
        if not layers:
            return None
        return round(sum(m.nnz for m in layers) / sum(m.numel_dense for m in layers), 2)

    def _plan(self):
        d = self.density()
        self.planned.append(d)
        floor = self.floor_of(d)
        if floor > self._options.budget:
            raise BudgetError(f"over at {d}", floor=floor, unoptimized=2000)
        return types.SimpleNamespace(notes=(), sparsity=None, density=d)

    def plan_for(self):
        return self.fallback.plan(self, self._plan, (), {}, runs=False)


def _floor(density):
    return 1000 if density is None else int(500 + 1000 * density)


def test_the_search_plans_the_sparsest_first_then_the_largest_density_that_fits():
    m = _Module(750, _floor)
    before = _snapshot(m.module, m.optimizer)
    plan = m.plan_for()
    # dense (fails), the sparsest (fits), then from the largest down: 0.5 and 0.3 fail, 0.2 fits
    assert m.planned == [None, 0.05, 0.5, 0.3, 0.2]
    assert plan.density == 0.2 and plan.sparsity.density == pytest.approx(0.2, abs=0.01)
    assert any("density 0.2 is the largest" in n and "0.5 (floor" in n for n in plan.notes)
    _same(before, _snapshot(m.module, m.optimizer))


def test_the_search_stops_at_the_sparsest_and_reports_the_lower_floor():
    m = _Module(500, _floor)
    before = _snapshot(m.module, m.optimizer)
    with pytest.raises(BudgetError) as err:
        m.plan_for()
    assert m.planned == [None, 0.05] and err.value.floor == 550
    assert err.value.unoptimized == 2000
    _same(before, _snapshot(m.module, m.optimizer))
    m = _Module(300, lambda d: 400 if d is None else 9999)  # the other levers' floor is lower
    with pytest.raises(BudgetError) as err:
        m.plan_for()
    assert err.value.floor == 400


def test_without_sparse_allowed_the_budget_error_is_the_other_levers():
    m = _Module(500, _floor, allow=EXACT)
    with pytest.raises(BudgetError, match="over at None") as err:
        m.plan_for()
    assert m.planned == [None] and err.value.floor == 1000


def test_sparsifying_in_place_is_put_back_exactly():
    m = _Module(1, _floor)
    model, opt = m.module, m.optimizer
    before = _snapshot(model, opt)
    weight = model[2].weight
    state = {k: v.clone() for k, v in opt.state[weight].items()}
    undo = _sparsify_in_place(model, 0.1, opt)
    assert isinstance(model[2], SparseLayer) and weight not in opt.state
    assert sparsity_report(model, opt).density == pytest.approx(0.1, abs=0.01)
    undo()
    _same(before, _snapshot(model, opt))
    for k, v in opt.state[weight].items():
        assert torch.equal(v, state[k])
