"""fxmem.optimize end to end (eager lowering): exact gradients, budgets that hold, clear errors."""

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxmem
from fxmem.examples import wide_resnet_28_2
from tests.graphs_for_tests import DataDependent, RandomNet, random_net_spec
from tests.helpers import (EAGER_RECOMPUTE, assert_same_grads, grads_of, measured_step_peak,
                           step_bounds)

TIME_LIMIT = 5  # seconds per solve (fxmem's default, 30, is for real models)
# the floor search (three smallest-peak solves, each to its time limit) at 2 s a solve: on these
# tiny steps it finds the floor 5 s finds, in less than half the time
BOUNDS_TIME_LIMIT = 2


def test_budget_above_the_unoptimised_peak_recomputes_nothing_and_matches_eager(tiny_gpt,
                                                                                same_grads):
    model, args, kwargs = tiny_gpt()
    om = fxmem.optimize(model, "10GiB", **EAGER_RECOMPUTE)
    same_grads(model, om, *args, **kwargs)
    plan = om.plan
    assert plan.record.recomputed == () and plan.solution.num_recomputed == 0
    assert plan.predicted_peak == plan.unoptimized_peak
    assert "predicted peak" in plan.report()
    assert set(plan.graphs) == {"joint", "forward", "backward"}
    assert plan.options.safety_margin == 0.01  # the default, resolved for the model's device


def test_default_margin_is_wider_only_where_the_model_is_unmeasured(tiny_gpt):
    from fxmem.planning.options import default_margin

    assert default_margin("eager", "cpu") == default_margin("inductor", "cpu") == 0.01
    assert default_margin("eager", "cuda") == 0.01
    assert default_margin("inductor", "cuda") == 0.03  # Triton's buffers not yet measured
    model, args, kwargs = tiny_gpt()
    plan = fxmem.optimize(model, "10GiB", safety_margin=0.2,
                          **EAGER_RECOMPUTE).plan_for(*args, **kwargs)
    assert plan.options.safety_margin == 0.2  # a margin given is kept


def test_budget_sweep_holds_is_monotone_and_keeps_gradients_exact(tiny_gpt):
    # one layer: the floor search and the six plans' solves cost about the graph's length
    model, args, kwargs = tiny_gpt(dropout=0.1, n_layer=1)
    expected = grads_of(model, model, *args, **kwargs)
    with pytest.raises(fxmem.BudgetError) as info:
        fxmem.optimize(model, 1024, time_limit=BOUNDS_TIME_LIMIT,
                       **EAGER_RECOMPUTE)(*args, **kwargs)
    floor, top = info.value.floor, info.value.unoptimized
    assert floor and info.value.holders
    plan = fxmem.optimize(model, "10GiB", **EAGER_RECOMPUTE).plan_for(*args, **kwargs)
    assert top == plan.unoptimized_peak
    assert floor < top
    # 1.1x: the floor comes from 2-second solves; a plan 2% (and, on a 2-core machine shared
    # with other jobs, 5%) over it was not always re-found in wall-clock-limited solves
    budgets = np.linspace(top, floor * 1.1, 6).astype(int)
    peaks = []
    for budget in budgets:
        om = fxmem.optimize(model, int(budget), time_limit=TIME_LIMIT, **EAGER_RECOMPUTE)
        got = grads_of(model, om, *args, **kwargs)
        assert_same_grads(expected, got)  # dropout included: recomputed masks replay the RNG
        measured = measured_step_peak(model, om, args, kwargs)
        assert measured <= budget, (budget, measured, om.plan.report())
        assert om.plan.predicted_peak == pytest.approx(measured, rel=0.01)
        peaks.append(measured)
    assert all(b <= a for a, b in zip(peaks, peaks[1:])), peaks  # never rises as budget falls
    assert peaks[-1] < 0.8 * peaks[0]


def test_rng_is_left_as_eager_leaves_it(tiny_gpt, budget_between):
    model, args, kwargs = tiny_gpt(dropout=0.2)
    grads_of(model, model, *args, **kwargs, seed=3)
    after_eager = torch.random.get_rng_state()
    # checkpointing the blocks recomputes their dropout at any budget under the peak; the ILP
    # near the floor did too, but its time-limited floor moved with the machine's load (a CI
    # run planned 2.46 MiB where the bounds had found 2.26)
    budget = budget_between(model, args, fraction=0.5, time_limit=BOUNDS_TIME_LIMIT,
                            **EAGER_RECOMPUTE)
    om = fxmem.optimize(model, budget, time_limit=TIME_LIMIT, strategy="checkpoint-blocks",
                        **EAGER_RECOMPUTE)
    om(*args)  # plan
    grads_of(model, om, *args, **kwargs, seed=3)
    assert om.plan.record.replayed, "the plan should recompute some dropout"
    assert torch.equal(torch.random.get_rng_state(), after_eager)


def test_batchnorm_model_matches_eager_including_running_statistics(budget_between):
    torch.manual_seed(0)
    model = wide_resnet_28_2(num_classes=10)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = grads_of(model, model, x, y)
    eager_stats = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    budget = budget_between(model, (x, y), fraction=0.3, time_limit=BOUNDS_TIME_LIMIT,
                            **EAGER_RECOMPUTE)
    om = fxmem.optimize(model, budget, time_limit=TIME_LIMIT, **EAGER_RECOMPUTE)
    model.load_state_dict(state)  # planning ran the model once
    assert_same_grads(expected, grads_of(model, om, x, y))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, eager_stats[k])
    assert om.plan.solution.num_recomputed > 0


def test_hugging_face_model_outputs_and_gradients(budget_between, same_grads):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64,
                                     vocab_size=1000, use_cache=False, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).train()
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, 1000, (2, 64))
    kwargs = {"input_ids": ids, "labels": ids}
    budget = budget_between(model, (), kwargs, fraction=0.3, time_limit=BOUNDS_TIME_LIMIT,
                            **EAGER_RECOMPUTE)
    om = fxmem.optimize(model, budget, time_limit=TIME_LIMIT, **EAGER_RECOMPUTE)
    same_grads(model, om, **kwargs)
    out = om(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 64, 1000) and not out.logits.requires_grad
    assert out.loss.requires_grad


def test_optimizer_state_counts_against_the_budget(tiny_gpt):
    model, args, _ = tiny_gpt()
    opt = torch.optim.Adam(model.parameters())
    without = fxmem.optimize(model, "10GiB", **EAGER_RECOMPUTE).plan_for(*args)
    with_adam = fxmem.optimize(model, "10GiB", optimizer=opt, **EAGER_RECOMPUTE).plan_for(*args)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    extra = with_adam.predicted_peak - without.predicted_peak
    assert extra >= 2 * params  # exp_avg and exp_avg_sq, plus step temporaries
    assert with_adam.timeline.breakdown(len(with_adam.timeline.labels) - 1)[
        "optimizer state"] >= 2 * params


def test_bad_input_is_a_clear_error(tiny_gpt):
    model, args, _ = tiny_gpt()
    with pytest.raises(ValueError, match="unknown levers"):
        fxmem.optimize(model, "1GiB", allow=("recompute", "teleport"), lowering="eager")
    with pytest.raises(ValueError, match="lowering"):
        fxmem.optimize(model, "1GiB", lowering="tpu", allow=("recompute",))
    with pytest.raises(fxmem.BudgetError, match="unknown unit"):
        fxmem.optimize(model, "1 parsec", **EAGER_RECOMPUTE)
    with pytest.raises(ValueError, match="strategy"):
        fxmem.optimize(model, "1GiB", strategy="magic", **EAGER_RECOMPUTE)
    with pytest.raises(TypeError, match="exact_random must be a bool"):
        fxmem.optimize(model, "1GiB", exact_random="yes", **EAGER_RECOMPUTE)
    with pytest.raises(fxmem.StepInputError, match="is on meta"):
        fxmem.optimize(model, "1GiB", **EAGER_RECOMPUTE)(args[0].to("meta"), args[1].to("meta"))


def test_graph_break_is_a_capture_error():
    with pytest.raises(fxmem.CaptureError, match="one graph") as info:
        fxmem.optimize(DataDependent(), "1GiB", **EAGER_RECOMPUTE)(torch.randn(3, 4))
    assert "backend='fxmem'" in str(info.value)  # where a step with breaks can still be planned


def test_inference_runs_the_model_unchanged(tiny_gpt):
    model, args, _ = tiny_gpt()
    om = fxmem.optimize(model, "1GiB", **EAGER_RECOMPUTE)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = model(*args)
        torch.manual_seed(0)
        torch.testing.assert_close(om(*args), expected)
    assert not om._compiled  # nothing was planned for a step without backward


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=random_net_spec(), width=st.sampled_from([16, 48]), fraction=st.floats(0.0, 1.0))
def test_random_graphs_give_eager_gradients(spec, width, fraction, budget_between, same_grads):
    torch.manual_seed(0)
    model = RandomNet(spec, width)
    x, y = torch.randn(64, width), torch.randint(0, 3, (64,))
    budget = budget_between(model, (x, y), fraction=fraction,
                            time_limit=BOUNDS_TIME_LIMIT,
                            **EAGER_RECOMPUTE) + 1
    om = fxmem.optimize(model, budget, time_limit=TIME_LIMIT, **EAGER_RECOMPUTE)
    same_grads(model, om, x, y)
    assert om.plan.predicted_peak <= budget


def test_profiled_costs_plan_too(tiny_gpt, budget_between, same_grads):
    model, args, kwargs = tiny_gpt()
    budget = budget_between(model, args, fraction=0.3, time_limit=BOUNDS_TIME_LIMIT,
                            **EAGER_RECOMPUTE)
    om = fxmem.optimize(model, budget, cost="profile", time_limit=TIME_LIMIT, **EAGER_RECOMPUTE)
    same_grads(model, om, *args, **kwargs)
    assert om.plan.solution.recompute_time > 0
    with pytest.raises(ValueError, match="cost must be"):
        fxmem.optimize(model, "1GiB", cost="guess", **EAGER_RECOMPUTE)


@pytest.mark.slow
def test_inductor_random_recomputed_reproduces_the_forward(tiny_gpt):
    """With ``exact_random=False`` Inductor draws dropout with its own seeded generator (not
    eager's values); a plan that recomputes the masks must still give the gradients of the plan
    that saves them, under the same seed."""
    model, args, kwargs = tiny_gpt(dropout=0.2, n_layer=1)  # each plan is an Inductor compile
    eager = grads_of(model, model, *args, **kwargs)
    saved = fxmem.optimize(model, "10GiB", lowering="inductor", exact_random=False,
                           allow=("recompute",))
    expected = grads_of(model, saved, *args, **kwargs)
    top = saved.plan.unoptimized_peak
    floor, unoptimised = step_bounds(model, args, kwargs, lowering="inductor",
                                     exact_random=False, time_limit=BOUNDS_TIME_LIMIT,
                                     allow=("recompute",))
    assert unoptimised == top
    # checkpointing the block recomputes its dropout whatever the memory model prefers (the
    # ILP's plan at 1.03x the floor may save every mask and recompute other ops instead)
    budget = (floor + top) // 2
    assert budget < top
    tight = fxmem.optimize(model, budget, lowering="inductor", exact_random=False,
                           time_limit=TIME_LIMIT, allow=("recompute",),
                           strategy="checkpoint-blocks")
    got = grads_of(model, tight, *args, **kwargs)
    assert tight.plan.solution.num_recomputed > 0
    recomputed = set(tight.plan.record.recomputed)
    assert any("random" in name for name in recomputed), sorted(recomputed)
    (l0, g0), (l1, g1) = expected, got
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected[0], eager[0])  # Inductor's masks, not eager's
    assert measured_step_peak(model, tight, args, kwargs) <= budget


_CHATTY_LOG = logging.getLogger("fxmem.tests.chatty")


class _Chatty(torch.nn.Module):
    """Logs from inside forward, as Hugging Face models do on their first call."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        _CHATTY_LOG.warning("first call")
        return self.lin(x).square().mean()


def test_logging_in_forward_is_no_graph_break():
    """fxmem captures the step as one graph; a logger call in forward (transformers'
    ``warning_once`` on a fresh model's first call) is dropped from it, not a CaptureError."""
    torch.manual_seed(0)
    model, x = _Chatty(), torch.randn(4, 8)
    expected = grads_of(model, model, x)
    om = fxmem.optimize(model, "1GiB", **EAGER_RECOMPUTE)
    assert_same_grads(expected, grads_of(model, om, x))


def test_the_first_call_runs_the_plan_plan_for_showed(tiny_gpt):
    """plan_for and the first call plan the same step: the same recomputation and prediction
    (the solver's answer is kept per problem, so a time-limited solve is not redone
    differently)."""
    model, args, kwargs = tiny_gpt(dropout=0.1)
    top = fxmem.optimize(model, "10GiB", **EAGER_RECOMPUTE).plan_for(*args, **kwargs)
    budget = int(0.8 * top.unoptimized_peak)
    om = fxmem.optimize(model, budget, time_limit=TIME_LIMIT, **EAGER_RECOMPUTE)
    shown = om.plan_for(*args, **kwargs)
    om(*args, **kwargs).backward()
    ran = om.plan
    assert ran is not shown and shown.record.recomputed  # planned again, with recomputation
    assert ran.record.recomputed == shown.record.recomputed
    assert ran.predicted_peak == shown.predicted_peak <= budget
