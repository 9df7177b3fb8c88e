"""The precision lever through ``torch.compile(backend="fxmem")``: a graph the exact levers
cannot fit is planned again under autocast (bf16), or every graph is with ``precision="bf16"``;
fp16 is refused with the reason (loss scaling belongs to the user's loop)."""

import pytest
import torch

import fxmem
from fxmem.api.backend import LAST_PLANS
from fxmem.graph.ops import base_name
from tests.helpers import grads_of, make_tiny_gpt

BF16 = torch.bfloat16
LOW = ("recompute", "precision")


def _compiled_step(model, args, options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxmem", options={"lowering": "eager", **options})
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # grads_of's seed
    loss = fxmem.loss_from_output(compiled(*args))
    loss.backward()
    return loss, [p.grad.clone() for p in model.parameters()], LAST_PLANS.latest


def _product_dtypes(plan, op="mm"):
    return {a.meta["val"].dtype for n in plan.graphs["joint"].graph.nodes
            if n.op == "call_function" and base_name(n.target) == op
            for a in n.all_input_nodes}


def _attention_heavy_gpt():
    """A tiny GPT whose attention (context 128) holds its peak: bf16 lowers its floor by 19%."""
    return make_tiny_gpt(seq=128, vocab=128)


def _backend_floor(options) -> int:
    model, args, _ = _attention_heavy_gpt()
    with pytest.raises(Exception) as info:
        _compiled_step(model, args, {"budget": 1, "time_limit": 5, **options})
    err = info.value
    while err is not None and not isinstance(err, fxmem.BudgetError):
        err = err.__cause__ or err.__context__
    assert err is not None and err.floor, info.value
    return err.floor


@pytest.fixture(scope="module")
def floors():
    """The floors the backend reports for the tiny GPT: the exact levers', and bf16's."""
    exact = _backend_floor({"allow": ("recompute",)})
    low = _backend_floor({"allow": LOW, "precision": "bf16"})
    assert low < exact, (low, exact)
    return exact, low


def test_forced_bf16_through_the_backend_casts_and_stays_close_to_fp32():
    model, args, _ = make_tiny_gpt(dropout=0.0)  # the same numbers as eager but for rounding
    expected_loss, expected = grads_of(model, model, *args)
    loss, grads, plan = _compiled_step(model, args, {"budget": 1 << 40, "allow": LOW,
                                                      "precision": "bf16"})
    assert any(r.name == "precision" for r in plan.provenance)
    assert _product_dtypes(plan) == {BF16}  # the matrix products of forward and backward
    assert loss.dtype == torch.float32  # the loss is on autocast's fp32 list
    torch.testing.assert_close(loss.detach(), expected_loss, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_the_backend_casts_only_when_the_exact_levers_do_not_fit(floors):
    exact, low = floors
    model, args, _ = _attention_heavy_gpt()
    _, _, plan = _compiled_step(model, args, {"budget": int(1.2 * exact), "allow": LOW,
                                              "time_limit": 5})
    assert not any(r.name == "precision" for r in plan.provenance)
    assert _product_dtypes(plan, "bmm") == {torch.float32}
    assert BF16 not in _product_dtypes(plan)
    budget = (exact + low) // 2
    _, _, plan = _compiled_step(model, args, {"budget": budget, "allow": LOW, "time_limit": 5})
    assert any(r.name == "precision" for r in plan.provenance)
    assert _product_dtypes(plan, "bmm") == {BF16}  # attention with dropout too
    assert plan.predicted_peak <= budget


def test_fp16_and_precision_without_the_lever_are_refused():
    model, args, _ = make_tiny_gpt()
    with pytest.raises(Exception, match="loss scaling"):  # torch.compile wraps the ValueError
        _compiled_step(model, args, {"budget": 1 << 40, "allow": LOW, "precision": "fp16"})
    with pytest.raises(Exception, match="allow it with"):
        _compiled_step(model, args, {"budget": 1 << 40, "precision": "bf16"})


def test_stored_bits_8_through_the_backend_lowers_the_bf16_floor():
    """A tiny GPT whose cross-entropy's log-probabilities (vocabulary 4096) hold its floor,
    planned as Inductor runs it: 8-bit storage lowers bf16 storage's floor by about 11%
    through fxmem.optimize (tests/levers/precision/test_stored_8bit.py); through the backend
    by more than 3% (the floors are time-limited solves: a margin, not a byte count)."""
    def floor(bits):
        model, args, _ = make_tiny_gpt(dropout=0.0, vocab=4096)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="fxmem", options={
            "budget": 1, "time_limit": 5, "lowering": "inductor", "allow": LOW,
            "precision": "bf16", "stored_bits": bits})
        with pytest.raises(Exception) as info:
            fxmem.loss_from_output(compiled(*args)).backward()
        err = info.value
        while err is not None and not isinstance(err, fxmem.BudgetError):
            err = err.__cause__ or err.__context__
        assert err is not None and err.floor, info.value
        return err.floor

    low, eight = floor(16), floor(8)
    assert eight < 0.97 * low, (eight, low)
    model, args, _ = make_tiny_gpt()
    with pytest.raises(Exception, match="stored_bits=8 stores"):
        _compiled_step(model, args, {"budget": 1 << 40, "stored_bits": 8})
