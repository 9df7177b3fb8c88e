"""bf16 compute against fp32: a tiny GPT and a tiny Hugging Face GPT-2 (from a config), each
planned with the precision lever (its graphs run as FX code), one step's loss, held outputs and
gradients compared with eager fp32 PyTorch's; and (slow) a tiny GPT with dropout planned under a
budget only bf16 with recomputation and microbatching on top meets.

Stated tolerances (bf16 keeps 8 bits of mantissa: one rounding is up to 2**-8 = 0.39% relative;
the products accumulate in fp32): the loss within 1e-2 relative; each parameter's gradient
within 2e-2 in relative L2 norm, and elementwise within rtol 2e-2 / atol 1e-3; the held logits
(bf16, as autocast gives them) within rtol 2e-2 / atol 2e-2. Measured here: relative L2 errors
of the gradients under 1% on both models.
"""

import pytest
import torch

import fxmem
from tests.helpers import grads_of, make_tiny_gpt

LOSS_RTOL, GRAD_NORM_RTOL = 1e-2, 2e-2
GRAD_TOL = {"rtol": 2e-2, "atol": 1e-3}
LOGITS_TOL = {"rtol": 2e-2, "atol": 2e-2}


def _tiny_hf_gpt2():
    pytest.importorskip("transformers")
    from bench.workloads import hf_gpt2

    w = hf_gpt2(batch=2, seq=64, n_layer=2, n_embd=64, n_head=2, vocab_size=512)
    return w["model"], w["args"], w["kwargs"]


def _bf16_module(model, args, kwargs):
    """fxmem.optimize with precision alone, just under the fp32 step's peak: planned in bf16."""
    fp32_peak = fxmem.optimize(model, 1 << 40, allow=("recompute",), lowering="eager").plan_for(
        *args, **kwargs).unoptimized_peak
    return fxmem.optimize(model, fp32_peak - 1, allow=("precision",), lowering="eager")


def _relative_error(got, expected):
    return ((got.float() - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def _check(model, args, kwargs):
    module = _bf16_module(model, args, kwargs)
    expected = grads_of(model, model, *args, **kwargs)
    got = grads_of(model, module, *args, **kwargs)
    assert any(r.name == "precision" for r in module.plan.provenance)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=LOSS_RTOL, atol=0)
    errors = []
    for g, e in zip(got[1], expected[1]):
        if e is None:
            assert g is None
            continue
        assert g.dtype == torch.float32
        errors.append(_relative_error(g, e))
        torch.testing.assert_close(g, e, **GRAD_TOL)
    assert errors and max(errors) < GRAD_NORM_RTOL, max(errors)
    assert max(errors) > 0  # the step did run in bf16
    return module


def test_a_tiny_gpt_in_bf16_is_within_bf16_tolerance_of_fp32():
    model, args, kwargs = make_tiny_gpt(dropout=0.0)
    _check(model, args, kwargs)


def test_a_tiny_hf_gpt2_in_bf16_is_within_bf16_tolerance_of_fp32():
    model, args, kwargs = _tiny_hf_gpt2()
    module = _check(model, args, kwargs)
    torch.manual_seed(1)  # GPT-2's dropout: the same masks in both
    expected = model(*args, **kwargs)
    torch.manual_seed(1)
    out = module(*args, **kwargs)
    assert out.logits.dtype == torch.bfloat16  # as torch.autocast gives them
    torch.testing.assert_close(out.logits.float(), expected.logits.detach(), **LOGITS_TOL)
    torch.testing.assert_close(out.loss, expected.loss.detach(), rtol=LOSS_RTOL, atol=0)


def _split_floor(model, args, **options):
    """The floor of the step split in two (``fxmem.floor`` takes no ``microbatches``)."""
    with pytest.raises(fxmem.BudgetError) as err:
        fxmem.optimize(model, 1, microbatches=2, **options).plan_for(*args)
    return err.value.floor


@pytest.mark.slow
def test_bf16_with_recompute_and_microbatching_on_top_stays_within_tolerance():
    """A budget under what the exact levers (recompute, microbatch) reach with the batch split in
    two: bf16 compute with the split and recomputation on top; dropout's masks drawn as eager's,
    so the gradients differ from fp32's by bf16's rounding only. The split is fixed at 2 (the
    choice of a split is tests/levers/microbatch's): searched, the two floors and the plan each
    planned every split, three times the work."""
    model, args, _ = make_tiny_gpt(dropout=0.1, batch=8, vocab=128, seq=128)
    options = {"lowering": "eager", "time_limit": 2.0}
    exact = _split_floor(model, args, allow=("recompute", "microbatch"), **options)
    low = _split_floor(model, args, allow=("recompute", "microbatch", "precision"),
                       precision="bf16", **options)
    assert low < exact
    module = fxmem.optimize(model, (low + exact) // 2, microbatches=2,
                            allow=("recompute", "microbatch", "precision"), **options)
    expected = grads_of(model, model, *args)
    got = grads_of(model, module, *args)
    plan = module.plan
    assert plan.microbatch is not None and len(plan.microbatch.sizes) > 1
    assert any(r.name == "precision" for r in plan.provenance)
    torch.testing.assert_close(got[0], expected[0], rtol=LOSS_RTOL, atol=0)
    errors = [_relative_error(g, e) for g, e in zip(got[1], expected[1])]
    assert max(errors) < GRAD_NORM_RTOL, max(errors)
