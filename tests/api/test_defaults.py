"""fxmem.optimize's defaults keep the design's promise (issue 17): the exact levers (recompute and
microbatch) and Inductor lowering, with ``BudgetError.floor`` the smallest peak over every allowed
lever; dropout split exactly (the microbatches read the whole batch's masks: HF BERT at a quarter
of its eager peak, tests/levers/microbatch/test_exact_random.py), and a step that cannot be split
exactly (BatchNorm; dropout with exact_random=False) run whole with a BudgetError that says
whether a split would have fitted and how to allow it."""

import inspect

import pytest
import torch

import fxmem
from fxmem.planning.options import EXACT_LEVERS
from tests.helpers import assert_same_grads, grads_of, measured_step_peak

transformers = pytest.importorskip("transformers")


def _llama(batch=8, seq=128, layers=2):
    """A Llama from a config (default use_cache, no dropout): activations dominate. 2 layers,
    not 4: capture (once per microbatch count), the solves and an Inductor compile cost about
    the graph's length, and what these tests check (a split fits a quarter of the eager peak;
    the split's floor is under the whole batch's) holds at 2 as at 4."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
    ids = torch.randint(0, 256, (batch, seq))
    return transformers.LlamaForCausalLM(config).train(), {"input_ids": ids, "labels": ids}


def _bert(batch=8, seq=64, dropout=0.1, layers=2):
    """HF BERT from a config with dropout. 2 layers, not 4, as for the Llama: a split still fits
    a quarter of the eager peak the whole batch cannot (recompute alone's floor is about 41% of
    it at 2 layers, 35% at 4)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=seq, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout)
    ids = torch.randint(0, 256, (batch, seq))
    return transformers.BertForMaskedLM(config).train(), {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_the_defaults_are_the_exact_levers_and_inductor():
    params = inspect.signature(fxmem.optimize).parameters
    assert params["allow"].default == EXACT_LEVERS == ("recompute", "microbatch")
    assert params["lowering"].default == "inductor"
    floor_params = inspect.signature(fxmem.floor).parameters
    assert floor_params["allow"].default == EXACT_LEVERS
    assert floor_params["lowering"].default == "inductor"


@pytest.mark.slow
def test_llama_at_a_quarter_of_its_eager_peak_fits_with_the_defaults():
    model, kwargs = _llama()
    eager_peak = measured_step_peak(model, model, (), kwargs)
    budget = eager_peak // 4
    expected = grads_of(model, model, **kwargs)
    om = fxmem.optimize(model, budget, time_limit=5.0)
    assert_same_grads(expected, grads_of(model, om, **kwargs))
    assert om.plan.options.lowering == "inductor"
    assert om.plan.microbatch is not None and len(om.plan.microbatch.sizes) > 1
    assert measured_step_peak(model, om, (), kwargs) <= budget


@pytest.mark.slow
def test_the_floor_with_microbatching_is_the_smallest_budget_that_plans():
    """BudgetError.floor over every allowed lever (the split with the smallest floor), not the
    whole batch's: a budget at the floor plans, 5% under it does not. One layer: the floor
    searches (whole, then per microbatch count) cost about the graph's length."""
    model, kwargs = _llama(batch=8, seq=64, layers=1)
    options = dict(lowering="eager", time_limit=5.0)
    with pytest.raises(fxmem.BudgetError) as whole:
        fxmem.optimize(model, 1, allow=("recompute",), **options).plan_for(**kwargs)
    with pytest.raises(fxmem.BudgetError) as split:
        fxmem.optimize(model, 1, **options).plan_for(**kwargs)
    floor = split.value.floor
    assert floor < whole.value.floor  # microbatching lowers it
    assert "microbatches" in str(split.value)
    plan = fxmem.optimize(model, floor, **options).plan_for(**kwargs)
    assert plan.microbatch is not None and len(plan.microbatch.sizes) > 1
    with pytest.raises(fxmem.BudgetError):
        fxmem.optimize(model, int(floor * 0.95), **options).plan_for(**kwargs)


@pytest.mark.slow
def test_without_exact_random_dropout_is_not_split_by_default_and_the_error_says_how():
    """With exact_random=False (Inductor's own generator) microbatches would draw other masks
    than the whole batch: not exact, so the default runs the step whole, and the BudgetError says
    a split would fit and how to allow it; allowed, it fits."""
    model, kwargs = _bert()
    options = dict(lowering="inductor", exact_random=False, time_limit=2.0)
    # the step's unoptimised peak (the estimate is a plan's, to the byte: tests/api/test_estimate)
    eager = fxmem.estimate(model, lowering="eager", **kwargs).peak
    budget = eager // 4
    with pytest.raises(fxmem.BudgetError) as err:
        fxmem.optimize(model, budget, **options).plan_for(**kwargs)
    message = str(err.value)
    assert "would fit this budget" in message and "dropout" in message
    assert 'microbatch_coupling="per-microbatch"' in message and "exact_random=True" in message
    plan = fxmem.optimize(model, budget, microbatch_coupling="per-microbatch",
                          **options).plan_for(**kwargs)
    assert len(plan.microbatch.sizes) > 1
    assert any("draw per microbatch" in n for n in plan.microbatch.notes)
