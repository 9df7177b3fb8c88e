"""fxmem.optimize with the microbatch lever: k chosen under the budget, exact gradients, the
whole batch's loss and outputs, budgets that hold, BatchNorm refused unless allowed."""

import copy

import pytest
import torch

import fxmem
from tests.helpers import assert_same_grads, grads_of, make_tiny_gpt, measured_step_peak


def gpt_no_dropout(batch=6, seq=32):
    # dropout off: a microbatch draws other masks than the whole batch does
    model, args, _ = make_tiny_gpt(n_head=4, dropout=0.0, batch=batch, seq=seq, targets="random")
    return model, args


def test_microbatching_alone_fits_a_budget_save_all_cannot_and_keeps_the_gradients():
    model, args = gpt_no_dropout()
    expected = grads_of(model, model, *args)
    unoptimised = fxmem.estimate(copy.deepcopy(model), *args).peak
    budget = int(0.7 * unoptimised)
    om = fxmem.optimize(model, budget, allow=("microbatch",), lowering="eager")
    assert_same_grads(expected, grads_of(model, om, *args))
    plan = om.plan
    assert plan.microbatch is not None and len(plan.microbatch.sizes) > 1
    assert sum(plan.microbatch.sizes) == args[0].shape[0]
    assert plan.predicted_peak <= budget
    assert "microbatch (k=" in plan.report()
    assert measured_step_peak(model, om, args, {}) <= budget


def test_a_budget_the_whole_batch_meets_is_not_microbatched():
    model, args = gpt_no_dropout()
    om = fxmem.optimize(model, "1GiB", allow=("recompute", "microbatch"), lowering="eager")
    om(*args).backward()
    assert om.plan.microbatch is None


@pytest.mark.parametrize("k", [2, 3])
def test_forced_uneven_split_on_hugging_face_gpt2_matches_the_whole_batch(k):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=32,
                                     vocab_size=300, use_cache=False, attn_implementation="sdpa",
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).train()
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, 300, (5, 32))
    labels = ids.clone()
    labels[0, 5:] = -100  # uneven numbers of targets per sample
    labels[3, :20] = -100
    ref = copy.deepcopy(model)
    ref_out = ref(input_ids=ids, labels=labels)
    ref_out.loss.backward()
    om = fxmem.optimize(model, "4GiB", microbatches=k, lowering="eager")
    out = om(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref_out.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, ref_out.logits.detach(), rtol=1e-5, atol=1e-5)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    assert list(om.plan.microbatch.sizes) == fxmem.levers.microbatch.runtime.split_sizes(5, k)


def small_bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).train()


def bn_loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def test_batchnorm_is_not_split_and_the_budget_error_says_a_split_would_fit():
    model = small_bn_net()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    floor = fxmem.estimate(copy.deepcopy(model), x, y, loss_fn=bn_loss).peak
    om = fxmem.optimize(model, int(0.6 * floor), allow=("microbatch",), loss_fn=bn_loss,
                        lowering="eager")
    with pytest.raises(fxmem.BudgetError, match="BatchNorm|batch_norm") as info:
        om(x, y)  # run whole (BatchNorm mixes samples): over budget, and the error says why
    assert "microbatch_coupling" in str(info.value)
    assert "would fit this budget" in str(info.value)


def test_batchnorm_per_microbatch_when_allowed_fits_the_budget_and_updates_running_stats_once():
    model = small_bn_net()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    floor = fxmem.estimate(copy.deepcopy(model), x, y, loss_fn=bn_loss).peak
    budget = int(0.6 * floor)
    om = fxmem.optimize(model, budget, allow=("microbatch",), loss_fn=bn_loss,
                        microbatch_coupling="per-microbatch", lowering="eager")
    tracked = model[1].num_batches_tracked.clone()
    om(x, y).backward()
    assert len(om.plan.microbatch.sizes) > 1
    assert "per-microbatch statistics" in om.plan.report()
    assert model[1].num_batches_tracked == tracked + 1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert measured_step_peak(model, lambda a, b: om(a, b), (x, y), {}) <= budget
