"""PlanOptions (what the user asked: validated, frozen) and StepContext (what fxmem derived: the
bytes a step holds beyond its graph, in the form the simulation takes)."""

import dataclasses

import pytest

from fxmem.planning.options import OPTIMIZER_STEP, PlanOptions, StepContext, default_margin


def test_plan_options_defaults_are_recompute_only_ilp_eager():
    opts = PlanOptions(budget=2**20)
    assert opts.allow == frozenset({"recompute"}) and isinstance(opts.allow, frozenset)
    assert (opts.strategy, opts.lowering, opts.cost) == ("ilp", "eager", "roofline")


def test_plan_options_take_allow_as_a_string_or_any_iterable():
    assert PlanOptions(budget=1, allow="microbatch").allow == frozenset({"microbatch"})
    assert PlanOptions(budget=1, allow=["recompute", "microbatch"]).allow == \
        frozenset({"recompute", "microbatch"})


@pytest.mark.parametrize("field, value, message", [
    ("budget", 0, "budget must be a positive number of bytes"),
    ("budget", -5, "budget must be a positive number of bytes"),
    ("budget", 1.5e9, "budget must be a positive number of bytes"),  # bytes are ints
    ("budget", "1GiB", "budget must be a positive number of bytes"),  # parsed before, not here
    ("allow", ("recompute", "teleport"), r"unknown levers \['teleport'\]"),
    ("strategy", "magic", "unknown strategy 'magic'"),
    ("lowering", "autograd", "lowering must be one of"),  # the joint's, not a plan's
    ("lowering", "tpu", "lowering must be one of"),
    ("cost", "guess", "cost must be 'roofline' or 'profile'"),
    ("safety_margin", -0.01, r"safety_margin must be in \[0, 0.5\)"),
    ("safety_margin", 0.5, r"safety_margin must be in \[0, 0.5\)"),
    ("time_limit", 0, "time_limit must be positive seconds"),
    ("time_limit", -1.0, "time_limit must be positive seconds"),
])
def test_plan_options_reject_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        PlanOptions(**{"budget": 2**20, field: value})


def test_plan_options_are_frozen():
    opts = PlanOptions(budget=2**20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.budget = 1


def test_margin_is_the_users_else_the_default_for_the_device():
    assert PlanOptions(budget=1000, safety_margin=0.2).margin_for("cuda") == 0.2
    unset = PlanOptions(budget=1000, lowering="inductor", safety_margin=None)
    assert unset.margin_for("cpu") == default_margin("inductor", "cpu") == 0.01
    assert unset.margin_for("cuda") == default_margin("inductor", "cuda") == 0.03


def test_limit_is_the_budget_less_the_margin():
    assert PlanOptions(budget=1000, safety_margin=0.1).limit_for("cpu") == 900
    assert PlanOptions(budget=1000, safety_margin=0.0).limit_for("cpu") == 1000
    assert PlanOptions(budget=1000, safety_margin=None).limit_for("cpu") == 990


def test_empty_context_holds_nothing():
    ctx = StepContext()
    assert ctx.constant == {} and ctx.epilogue_points == []


def test_optimizer_context_holds_its_state_throughout_and_its_step_after_the_backward():
    ctx = StepContext.of_optimizer(state_bytes=800, step_bytes=96)
    assert ctx.constant == {"optimizer state": 800}
    assert ctx.epilogue_points == [(OPTIMIZER_STEP, {"temporaries": 96})]
    # SGD without momentum: no state and no step temporaries, so no epilogue point either
    assert StepContext.of_optimizer(0, 0) == StepContext()


def test_constant_sums_resident_bytes_by_category_and_plus_adds_only_nonzero_ones():
    ctx = StepContext.of_optimizer(800, 96).plus({"gradients": 40, "inputs": 0})
    ctx = ctx.plus({"gradients": 2, "outputs": 7})
    assert ctx.constant == {"optimizer state": 800, "gradients": 42, "outputs": 7}
    assert ("inputs", 0) not in ctx.resident
    assert ctx.epilogue_points == [(OPTIMIZER_STEP, {"temporaries": 96})]  # unchanged by plus


def test_context_key_is_stable_and_tells_contexts_apart():
    a = StepContext.of_optimizer(800, 96)
    assert a.key() == StepContext.of_optimizer(800, 96).key()
    assert a.key() != StepContext.of_optimizer(800, 97).key()
    assert a.key() != a.plus({"gradients": 1}).key()
