"""Saved values stored in 8 bits (``stored_bits=8``): blockwise int8 codes with an fp32 scale.

On plain FX graphs: the quantisation round-trips a value to within half a step of its block's
scale, and each way the plan can go is carried out (stored in 8 bits, in bf16 -- the
dequantisation replaced by the bf16 copy's cast --, or not at all -- the backward reads the
value). On a tiny GPT with bf16 compute at the 8-bit floor (Inductor): the floor is under what
bf16 storage alone meets, some values are stored in 8 bits (the backward receives int8 codes and
dequantises them), the measured peak is within the budget and within 3% of the prediction, and
the gradients are within 8-bit storage's tolerance of fp32's."""

import copy

import pytest
import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing import FileCheck

import fxmem
from fxmem.levers.precision.stored_8bit import BLOCK, can_quantise, offer_8bit, unwind_8bit
from tests.helpers import make_tiny_gpt

PRECISE = ("recompute", "precision")
CONVERT = torch.ops.prims.convert_element_type.default


def _graph(low_is_input: bool):
    """``out = 2 * float(bf16(x))`` with the bf16 copy made in the graph, or received as an
    input (a backward that was passed it); returns the module and its low, restored nodes."""
    mode = FakeTensorMode()
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    with mode:
        x.meta["val"] = torch.empty(6, 2 * BLOCK, dtype=torch.bfloat16 if low_is_input
                                    else torch.float32)
        low = x if low_is_input else graph.call_function(CONVERT, (x, torch.bfloat16))
        low.meta["val"] = x.meta["val"].to(torch.bfloat16)
        restored = graph.call_function(CONVERT, (low, torch.float32))
        restored.meta["val"] = low.meta["val"].float()
        out = graph.call_function(torch.ops.aten.mul.Tensor, (restored, 2.0))
        out.meta["val"] = restored.meta["val"] * 2
    graph.output(out)
    return torch.fx.GraphModule(torch.nn.Module(), graph), low, restored


def _unwound(low_is_input: bool, expected: str):
    """``_graph``'s module offered in 8 bits, then unwound as a plan that saves the bf16 copy
    (``low_is_input``) or not; asserts the way it went."""
    gm, low, restored = _graph(low_is_input)
    e = offer_8bit(gm.graph, low, restored, {})
    assert unwind_8bit(gm, e, low.name) == expected
    gm.graph.lint()
    gm.recompile()
    return gm


def _values():
    torch.manual_seed(0)
    x = torch.randn(6, 2 * BLOCK)
    x[0] *= 1e3  # blocks of very different scales
    x[1] = 0.0  # an all-zero block: scale clamped, codes 0
    return x


def test_the_quantisation_rounds_within_half_a_step_of_each_blocks_scale():
    gm, low, restored = _graph(low_is_input=False)
    e = offer_8bit(gm.graph, low, restored, {})
    gm.graph.lint()
    gm.recompile()
    x = _values()
    got = gm(x) / 2
    blocks = x.to(torch.bfloat16).float().view(-1, BLOCK)
    step = blocks.abs().amax(1, keepdim=True) / 127
    err = (got.view(-1, BLOCK) - blocks).abs()
    assert (err <= step / 2 + 1e-6 * blocks.abs()).all()
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert e.nbytes == x.numel() + 4 * x.numel() // BLOCK
    codes = [n for n in gm.graph.nodes if n.name == e.q][0]
    assert codes.meta["val"].dtype == torch.int8
    FileCheck().check("torch.ops.aten.amax.default").check("torch.ops.aten.round.default") \
        .check("torch.int8").check("torch.ops.aten.mul.Tensor").run(gm.code)


def test_a_plan_that_saves_the_bf16_copy_reads_it_without_the_8bit_rounding():
    gm = _unwound(low_is_input=True, expected="bf16")
    assert not any(n.target in (torch.ops.aten.round.default, torch.ops.aten.amax.default)
                   for n in gm.graph.nodes)
    x = _values().to(torch.bfloat16)
    torch.testing.assert_close(gm(x), x.float() * 2, rtol=0, atol=0)


def test_a_plan_that_keeps_the_value_reads_it_exactly():
    gm = _unwound(low_is_input=False, expected="none")
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == \
        [torch.ops.aten.mul.Tensor]
    x = _values()
    torch.testing.assert_close(gm(x), x * 2, rtol=0, atol=0)


def test_what_can_be_offered_and_bad_input():
    with FakeTensorMode():
        assert can_quantise(torch.empty(4, BLOCK))
        assert not can_quantise(torch.empty(4, BLOCK + 1))  # not whole blocks
        assert not can_quantise(torch.empty(BLOCK, 4).t())  # not contiguous
        assert not can_quantise(torch.empty(4, BLOCK, dtype=torch.float64))
    model, args, _ = make_tiny_gpt()
    with pytest.raises(ValueError, match="allow it with allow=.*'precision'"):
        fxmem.optimize(model, "1GiB", stored_bits=8)
    with pytest.raises(ValueError, match="stored_bits must be 16"):
        fxmem.optimize(model, "1GiB", allow=PRECISE, stored_bits=4)


@pytest.fixture(scope="module")
def at_the_8bit_floor():
    """A tiny GPT (4096-token vocabulary, no dropout), bf16 compute, planned at the first budget
    from its 8-bit floor up that stores a value in 8 bits, run once; eager fp32's gradients."""
    model, args, _ = make_tiny_gpt(dropout=0.0, vocab=4096)
    reference = copy.deepcopy(model)
    floor = fxmem.floor(copy.deepcopy(model), *args, allow=PRECISE, precision="bf16",
                        stored_bits=8, time_limit=5)
    for factor in (1.0, 1.005, 1.01):
        candidate = copy.deepcopy(model)
        try:
            optimized = fxmem.optimize(candidate, int(factor * floor), allow=PRECISE,
                                       precision="bf16", stored_bits=8, time_limit=5)
            plan = optimized.plan_for(*args)
        except fxmem.BudgetError:
            continue
        if next(r for r in plan.provenance if r.name == "stored-low").details.values_8bit:
            model = candidate
            break
    else:
        pytest.fail("no budget from the 8-bit floor to 1.01x stores a value in 8 bits")
    optimized(*args)
    for p in model.parameters():
        p.grad = None
    measured = fxmem.measure_memory(lambda: optimized(*args).backward(), device="cpu",
                                    baseline=[model, *args])
    eager = copy.deepcopy(reference)
    eager(*args).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return floor, optimized.plan, measured, grads, dict(eager.named_parameters()), \
        (reference, args)


def test_the_8bit_floor_is_under_what_bf16_storage_meets(at_the_8bit_floor):
    floor, *_, (reference, args) = at_the_8bit_floor
    with pytest.raises(fxmem.BudgetError):
        fxmem.optimize(copy.deepcopy(reference), floor, allow=PRECISE, precision="bf16",
                       time_limit=5).plan_for(*args)


def test_values_are_stored_in_8bits_and_the_backward_dequantises_the_codes(at_the_8bit_floor):
    _, plan, *_ = at_the_8bit_floor
    record = next(r for r in plan.provenance if r.name == "stored-low").details
    assert record.values_8bit and record.low_nbytes_8bit < 0.27 * record.nbytes_8bit
    assert "in 8 bits with a scale per 128 values" in record.summary()
    assert "in 8 bits" in plan.report()
    backward = plan.graphs["backward"]
    codes = [n for n in backward.graph.nodes
             if n.op == "placeholder" and n.meta["val"].dtype == torch.int8]
    assert len(codes) >= len(record.values_8bit)
    for q in codes:
        cast = next(u for u in q.users if u.target is CONVERT)
        FileCheck().check(f"{cast.name} = torch.ops.prims.convert_element_type.default("
                          f"{q.name}, torch.float32)").check("torch.ops.aten.mul.Tensor(" +
                                                              cast.name).run(backward.code)


def test_the_measured_peak_is_within_the_budget_and_predicted(at_the_8bit_floor):
    _, plan, measured, *_ = at_the_8bit_floor
    assert measured.peak <= plan.budget
    assert abs(plan.predicted_peak - measured.peak) <= 0.03 * measured.peak


def test_gradients_are_within_8bit_storage_tolerance_of_fp32(at_the_8bit_floor):
    *_, got, eager, _ = at_the_8bit_floor
    assert got.keys() == {n for n, p in eager.items() if p.grad is not None}
    for name, g in got.items():
        expected = eager[name].grad
        err = (g - expected).norm() / expected.norm().clamp_min(1e-12)
        assert err < 0.05, (name, float(err))
