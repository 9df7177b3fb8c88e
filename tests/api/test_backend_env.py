"""torch.compile(model, backend="fxmem") without a budget option: the budget comes from the
environment variable FXMEM_BUDGET, read when the options are resolved."""

import pytest
import torch
import torch._dynamo

import fxmem
from fxmem.api.backend import BUDGET_ENV, LAST_PLANS, options_from_mapping
from tests.helpers import measured_step_peak

TIME_LIMIT = 5  # seconds per solve


def test_the_budget_comes_from_the_environment_without_options(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "1.5GiB")
    opts, _, _ = options_from_mapping(None)
    assert opts.budget == 3 * 2**29
    monkeypatch.setenv(BUDGET_ENV, " 4096 ")
    assert options_from_mapping({"lowering": "eager"})[0].budget == 4096


def test_an_option_budget_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "1GiB")
    assert options_from_mapping({"budget": "1MiB"})[0].budget == 2**20


@pytest.mark.parametrize("raw", ["60%", "2 furlongs", "-1GiB", "lots"])
def test_a_bad_environment_budget_is_refused_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv(BUDGET_ENV, raw)
    with pytest.raises(fxmem.BudgetError, match=f"{BUDGET_ENV}=") as info:
        options_from_mapping({})
    assert "512MiB" in str(info.value)
    if raw.endswith("%"):
        assert "unoptimised peak" in str(info.value)


@pytest.mark.parametrize("value", [None, "", "  "])
def test_no_budget_anywhere_is_refused_naming_the_variable(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(BUDGET_ENV, raising=False)
    else:
        monkeypatch.setenv(BUDGET_ENV, value)
    with pytest.raises(ValueError, match=f"needs a budget.*{BUDGET_ENV}"):
        options_from_mapping(None)


def test_compile_with_the_environment_budget_plans_and_runs_under_it(monkeypatch, tiny_gpt):
    model, args, _ = tiny_gpt(vocab=256, seq=32)
    budget = int(0.85 * fxmem.optimize(model, "10GiB", lowering="eager", allow=("recompute",))
                 .plan_for(*args).unoptimized_peak)
    monkeypatch.setenv(BUDGET_ENV, f"{budget}B")
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="fxmem",
                                 options={"lowering": "eager", "time_limit": TIME_LIMIT})
        peak = measured_step_peak(model, compiled, args, {})
    finally:
        torch._dynamo.reset()
    plan = LAST_PLANS.latest
    assert plan.budget == budget and plan.predicted_peak <= budget
    assert plan.solution.num_recomputed > 0
    assert peak <= budget, (peak, budget)


@pytest.mark.slow
def test_compile_without_options_lowers_through_inductor_under_the_environment_budget(
        monkeypatch, tiny_gpt):
    model, args, _ = tiny_gpt(vocab=256, seq=32, n_layer=1)
    budget = int(0.9 * fxmem.optimize(model, "10GiB").plan_for(*args).unoptimized_peak)
    monkeypatch.setenv(BUDGET_ENV, str(budget))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="fxmem")
        peak = measured_step_peak(model, compiled, args, {})
    finally:
        torch._dynamo.reset()
    plan = LAST_PLANS.latest
    assert plan.budget == budget and plan.options.lowering == "inductor"
    assert peak <= budget, (peak, budget)
