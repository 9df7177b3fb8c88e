"""The bench workloads through Inductor: torch.compile(backend="fxmem") at a smaller size, and
WRN-28-2 at the bench's size a little over its floor. Split from test_bench_workloads.py (same
solver limits): each file is one xdist scope (--dist loadscope), and together they kept one of
the two workers busy for minutes after the other had finished."""

import gc

import pytest
import torch

from bench.workloads import WORKLOADS
from tests.helpers import assert_same_grads, grads_of
from tests.test_bench_workloads import BOUNDS_TIME_LIMIT, TIME_LIMIT


# the bench's architectures with fewer of their blocks: an Inductor compile costs about its
# graph's length (tens of seconds per graph on a 2-core CPU), not its batch. One of the GPTs'
# layers: a plan between the floor and the peak still recomputes, and the gradients still meet
# the tolerance (WRN-10-2 is the least depth a WRN has)
SMALL = {"gpt_decoder": dict(batch=8, seq=128, n_layer=1), "wrn_28_2": dict(batch=16, depth=10),
         "hf_gpt2": dict(batch=4, seq=128, n_layer=1)}


def _deviation(expected, got):
    return max([(got[0] - expected[0]).abs().item()]
               + [(b - a).abs().max().item() for a, b in zip(expected[1], got[1])])


def _backend_budget(model, args, kwargs):
    """30% of the way from the backend's own floor to its unoptimised peak (through torch.compile
    outputs that require grad get tangents, so its floor differs from fxmem.optimize's)."""
    import fxmem
    import torch._dynamo

    torch._dynamo.reset()
    try:
        torch.compile(model, backend="fxmem",
                      options={"budget": 4096, "time_limit": BOUNDS_TIME_LIMIT})(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        err = exc.inner_exception
        assert isinstance(err, fxmem.BudgetError) and err.floor and err.unoptimized
    torch._dynamo.reset()
    assert err.floor < err.unoptimized, "no room to recompute at this size"
    return int(err.floor + 0.3 * (err.unoptimized - err.floor))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_backend_bench_workload_gradients_through_inductor(name):
    """The bench architectures through torch.compile(backend="fxmem") at a smaller batch and depth
    (1 of the GPTs' layers, WRN-10-2), dropout on, something recomputed: gradients equal eager
    PyTorch's. Inductor's CPU convolutions round differently from eager's, so for the WideResNet
    the bound is Inductor's own deviation (fxmem must add no error of its own)."""
    import torch._dynamo
    from fxmem.api.backend import LAST_PLANS

    if name == "hf_gpt2":
        pytest.importorskip("transformers")
    w = WORKLOADS[name](**SMALL[name])
    model, args, kwargs = w["model"], w["args"], w["kwargs"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = grads_of(model, model, *args, **kwargs)
    budget = _backend_budget(model, args, kwargs)
    model.load_state_dict(state)
    compiled = torch.compile(model, backend="fxmem",
                             options={"budget": budget, "time_limit": TIME_LIMIT})
    got = grads_of(model, compiled, *args, **kwargs)
    assert LAST_PLANS.latest.solution.num_recomputed > 0
    assert LAST_PLANS.latest.predicted_peak <= budget
    if name == "wrn_28_2":
        model.load_state_dict(state)
        torch._dynamo.reset()
        inductor = grads_of(model, torch.compile(model), *args, **kwargs)
        assert _deviation(expected, got) <= 1.5 * _deviation(expected, inductor) + 2e-5
    else:
        assert_same_grads(expected, got, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def wrn_inductor_floor():
    """WRN-28-2 at the bench's size and its floor through Inductor (one plan, shared by the
    budgets over it)."""
    import fxmem

    w = WORKLOADS["wrn_28_2"]()
    model, args, kwargs = w["model"], w["args"], w["kwargs"]
    floor = fxmem.floor(model, *args, lowering="inductor", time_limit=TIME_LIMIT, **kwargs)
    return model, args, kwargs, floor


# At 1.02x its floor WRN-28-2 once measured 174.21 MiB against 166.32 predicted, over a 171.36
# budget (3b85315). Deciding realisation in graph order (f7fbfe7) made one plan there exact
# (175.86 MiB measured = predicted, budget 181.19), but a clean-clone run whose time-limited floor
# came out lower planned another that measured 182.67 MiB over a 179.68 MiB budget: still a
# known miss near this floor, not yet found.
# Not run (run=False): a non-strict xfail passes whether or not the plan holds, so in CI it only
# cost a minute of a worker (a plan and an Inductor compile of WRN-28-2); run it by hand with
# ``pytest --runxfail -k 1.02`` when working on that miss.
NEAR_FLOOR_MISS = pytest.mark.xfail(
    reason="WRN-28-2 at 1.02x its floor through Inductor: some plans measure over the budget "
           "(182.67 MiB against 179.68 in a clean-clone run)", strict=False, run=False)


@pytest.mark.slow
@pytest.mark.parametrize("over_floor", [pytest.param(1.02, marks=NEAR_FLOOR_MISS), 1.11])
def test_inductor_plan_near_its_floor_holds_the_budget(over_floor, wrn_inductor_floor):
    """WRN-28-2 through Inductor a little over fxmem's floor: the measured peak is under the
    budget and within the planning margin of the prediction (recomputed ReLUs that Inductor fused
    into an earlier kernel once held 10 MiB more than planned here)."""
    import fxmem
    from fxmem.planning.options import default_margin

    model, args, kwargs, floor = wrn_inductor_floor
    budget = int(floor * over_floor)
    om = fxmem.optimize(model, budget, lowering="inductor", time_limit=TIME_LIMIT,
                        allow=("recompute",))

    def step():
        out = om(*args, **kwargs)
        fxmem.loss_from_output(out).backward()

    step()
    model.zero_grad(set_to_none=True)
    gc.collect()
    peak = fxmem.measure_memory(step, baseline=[model, list(args), list(kwargs.values())]).peak
    assert om.plan.solution.num_recomputed > 0
    assert peak <= budget, (peak, budget, om.plan.report())
    assert abs(peak - om.plan.predicted_peak) <= default_margin("inductor", "cpu") * budget
