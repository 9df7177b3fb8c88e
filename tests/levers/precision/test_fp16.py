"""fp16 compute casts with dynamic loss scaling (``fxmem.optimize(precision="fp16")``), on a tiny
GPT (1 layer, its graphs run as FX code; CPU autocast takes fp16 on torch 2.13):

- the casts: matrix products and attention read fp16, the norms, the softmax and the loss fp32,
  the parameters and their gradients fp32; the report names fp16 and the loss scaling;
- numerics: one step's loss and gradients against eager fp32's. Stated tolerances (fp16 keeps
  11 bits of mantissa: one rounding is up to 2**-11 = 0.05% relative; the products accumulate in
  fp32): the loss within 2e-3 relative, each parameter's gradient within 1e-2 in relative L2
  norm. Measured here: under 0.1%;
- the loss scaler, in the ordinary loop (``loss.backward(); opt.step(); opt.zero_grad()``): it
  keeps gradients an unscaled fp16 backward flushes to zero, skips a step whose backward
  overflowed (parameters and Adam's state untouched, the scale halved; the next good step
  updates), doubles the scale after ``growth_interval`` good steps, and leaves extra loss terms
  and gradient accumulation unscaled; with a microbatched step too;
- a user's own ``torch.amp.GradScaler`` with ``loss_scaling="off"`` matches eager autocast with
  the same GradScaler;
- (slow) under DDP on 2 gloo ranks, one rank's overflow skips the step on both;
- bad input is a clear error.
"""

import datetime
import gc
import math
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxmem
from fxmem.graph.ops import base_name
from fxmem.levers.precision import ComputeCasts, LossScaler, LossScaling
from fxmem.levers.precision.casts import is_compute_op
from tests.helpers import grads_of, make_tiny_gpt

FP16, FP32 = torch.float16, torch.float32
LOSS_RTOL, GRAD_NORM_RTOL = 2e-3, 1e-2
EAGER = {"lowering": "eager", "time_limit": 5.0}
ALLOW = ("recompute", "precision")
RANGE_OPS = {"native_layer_norm", "native_layer_norm_backward", "_log_softmax",
             "_log_softmax_backward_data", "nll_loss_forward", "nll_loss_backward"}
TINY = {"n_layer": 1, "dropout": 0.0}


def _fp16(model, **options):
    return fxmem.optimize(model, "1GiB", allow=ALLOW, precision="fp16", **{**EAGER, **options})


def _float_inputs(node):
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    return [v.dtype for v in vals if isinstance(v, torch.Tensor) and v.dtype.is_floating_point]


def _relative_error(got, expected):
    return ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _max_error(got, expected):
    return max(_relative_error(g, e) for g, e in zip(got, expected) if e is not None)


@pytest.fixture(scope="module")
def fp16_plan():
    model, args, _ = make_tiny_gpt(**TINY)
    return _fp16(model).plan_for(*args)


def test_fp16_casts_put_the_products_in_fp16_and_keep_the_loss_and_gradients_fp32(fp16_plan):
    seen, ranged = set(), set()
    for key in ("forward", "backward"):
        for node in fp16_plan.graphs[key].graph.nodes:
            if node.op != "call_function":
                continue
            name = base_name(node.target)
            dtypes = _float_inputs(node)
            if is_compute_op(node):
                seen.add(name)
                if name.startswith("_scaled_dot_product") and name.endswith("backward"):
                    dtypes = dtypes[:5]  # grad_out, q, k, v, out (the logsumexp is fp32)
                assert dtypes and set(dtypes) == {FP16}, (key, node.name, dtypes)
            elif name in RANGE_OPS:
                ranged.add(name)
                assert set(dtypes) == {FP32}, (key, node.name, dtypes)
    assert {"mm", "addmm", "_scaled_dot_product_flash_attention_for_cpu"} <= seen
    assert ranged == RANGE_OPS
    forward, backward = fp16_plan.graphs["forward"], fp16_plan.graphs["backward"]
    assert forward.graph.output_node().args[0][0].meta["val"].dtype == FP32  # the loss
    grads = [n for n in backward.graph.output_node().args[0] if isinstance(n, torch.fx.Node)]
    assert grads and {n.meta["val"].dtype for n in grads} == {FP32}
    params = [n for n in forward.graph.nodes if n.op == "placeholder"
              and n.meta["val"].dtype.is_floating_point]
    assert params and {n.meta["val"].dtype for n in params} == {FP32}


def test_the_report_names_fp16_and_the_loss_scaling(fp16_plan):
    report = fp16_plan.report()
    assert "levers used: precision (float16 compute) (lossy" in report
    assert "loss scaling: dynamic, from 65536: x2 after 2000 good backward passes" in report
    record = next(r for r in fp16_plan.provenance if r.name == "precision")
    assert record.details.dtype == "float16" and record.details.num_low_ops > 10
    assert "float16 copies of parameters" in record.summary
    assert any("run in float16" in n and "loss scaling" in n for n in fp16_plan.notes)


def test_an_fp16_step_is_within_fp16_tolerance_of_fp32():
    model, args, _ = make_tiny_gpt(**TINY)
    expected = grads_of(model, model, *args)
    module = _fp16(model)
    loss, grads = grads_of(model, module, *args)
    assert loss.dtype == FP32 and all(g.dtype == FP32 for g in grads)
    torch.testing.assert_close(loss, expected[0], rtol=LOSS_RTOL, atol=0)
    error = _max_error(grads, expected[1])
    assert 0 < error < GRAD_NORM_RTOL, error  # not 0: the step did run in fp16
    scaler = module.loss_scaler
    assert isinstance(scaler, LossScaler) and scaler.passes == 1 and scaler.skipped == 0
    assert "loss scaling: scale 65536" in module.plan.report()
    assert "0 of 1 backward passes skipped" in module.plan.report()


def test_loss_scaling_keeps_the_gradients_an_unscaled_fp16_backward_flushes():
    """A loss times 3e-4: its logits' gradients (~2e-9) are under fp16's smallest subnormal
    (6e-8), so an unscaled fp16 backward loses them (measured here: 34% of the gradients' elements
    zero, every parameter's gradient 10% to 100% off); scaled by 2**16 they are normal numbers."""
    model, args, _ = make_tiny_gpt(**TINY)
    small = lambda m, idx, tgt: m(idx, tgt) * 3e-4  # noqa: E731
    expected = grads_of(model, lambda *a: small(model, *a), *args)
    scaled = grads_of(model, _fp16(model, loss_fn=small), *args)[1]
    unscaled = grads_of(model, _fp16(model, loss_fn=small, loss_scaling="off"), *args)[1]
    assert _max_error(scaled, expected[1]) < GRAD_NORM_RTOL
    assert _max_error(unscaled, expected[1]) > 0.5  # flushed to zero
    zeros = lambda grads: (sum(int((g == 0).sum()) for g in grads)  # noqa: E731
                           / sum(g.numel() for g in grads))
    assert zeros(expected[1]) == 0 and zeros(scaled) < 0.01 and zeros(unscaled) > 0.2


def _huge_loss(model, idx, tgt, factor):
    return model(idx, tgt) * factor


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}
             for k, s in opt.state.items()}
    return params, state


def _assert_unchanged(model, opt, snapshot):
    params, state = snapshot
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
    assert opt.state.keys() == state.keys()
    for k, s in opt.state.items():
        for n, v in s.items():
            assert torch.equal(v, state[k][n]), n


def test_an_overflow_skips_the_step_halves_the_scale_and_the_next_step_updates():
    """The loss times 1e30 (an input: the same plan) overflows the fp16 backward: in the user's
    loop, opt.step() leaves the parameters and Adam's state (moments, step counts) as they were,
    the scale halves; the next step (factor 1) updates them."""
    model, (idx, tgt), _ = make_tiny_gpt(**TINY)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    module = _fp16(model, loss_fn=_huge_loss, optimizer=opt)
    one, huge = torch.tensor(1.0), torch.tensor(1e30)

    def step(factor):
        loss = module(idx, tgt, factor)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step(one)  # Adam's state exists
    scaler = module.loss_scaler
    assert (scaler.scale, scaler.skipped, scaler.growth_tracker) == (2.0 ** 16, 0, 1)
    before = _snapshot(model, opt)
    loss = step(huge)
    assert math.isfinite(loss.item())  # the loss is fp32: only the fp16 backward overflowed
    _assert_unchanged(model, opt, before)
    assert all(p.grad is None for p in model.parameters())
    assert (scaler.scale, scaler.skipped, scaler.passes, scaler.growth_tracker) == \
        (2.0 ** 15, 1, 2, 0)
    assert "1 of 2 backward passes skipped on overflow" in module.plan.report()
    step(one)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before[0]))
    assert all(int(s["step"]) == 2 for s in opt.state.values())
    assert (scaler.scale, scaler.skipped, scaler.growth_tracker) == (2.0 ** 15, 1, 1)


def test_with_the_optimizer_known_an_overflow_skips_the_whole_accumulated_step():
    """Three backward passes accumulate; the second overflows: the whole step is skipped (as
    GradScaler skips it), not just the gradients accumulated before the overflow."""
    model, (idx, tgt), _ = make_tiny_gpt(**TINY)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    module = _fp16(model, loss_fn=_huge_loss, optimizer=opt)
    before = _snapshot(model, opt)
    for factor in (1.0, 1e30, 1.0):
        module(idx, tgt, torch.tensor(factor)).backward()
    assert all(p.grad is not None for p in model.parameters())  # the third pass's
    opt.step()
    _assert_unchanged(model, opt, before)
    opt.zero_grad()
    module(idx, tgt, torch.tensor(1.0)).backward()  # the next step is not skipped
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before[0]))


def test_the_scale_doubles_after_growth_interval_good_steps():
    model, args, _ = make_tiny_gpt(**TINY)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    module = _fp16(model, optimizer=opt,
                   loss_scaling=LossScaling(init_scale=8.0, growth_interval=3))
    scales = []
    for _ in range(7):
        module(*args).backward()
        opt.step()
        opt.zero_grad()
        scales.append(module.loss_scaler.scale)
    assert scales == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]
    assert module.loss_scaler.growth_tracker == 1


def test_extra_loss_terms_and_accumulation_see_unscaled_gradients():
    """Only the step's own gradients are scaled and unscaled: a term added to the loss after
    the step, and a second backward accumulating into .grad, come out as in fp32."""
    model, args, _ = make_tiny_gpt(**TINY)
    module = _fp16(model)
    single = grads_of(model, module, *args)[1]
    weight = model.lm_head.weight if hasattr(model, "lm_head") else next(model.parameters())
    loss = module(*args) + 1e-3 * weight.square().sum()
    loss.backward()
    module(*args).backward()  # accumulates
    for p, g in zip(model.parameters(), single):
        expected = 2 * g + (2e-3 * weight.detach() if p is weight else 0)
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
    assert module.loss_scaler.passes == 3 and module.loss_scaler.skipped == 0


def test_a_microbatched_fp16_step_scales_each_microbatch():
    model, args, _ = make_tiny_gpt(**TINY)
    small = lambda m, idx, tgt: m(idx, tgt) * 3e-4  # noqa: E731
    expected = grads_of(model, lambda *a: small(model, *a), *args)
    module = _fp16(model, loss_fn=small, microbatches=2)
    loss, grads = grads_of(model, module, *args)
    assert module.plan.microbatch is not None and len(module.plan.microbatch.sizes) == 2
    torch.testing.assert_close(loss, expected[0], rtol=LOSS_RTOL, atol=0)
    assert _max_error(grads, expected[1]) < GRAD_NORM_RTOL
    assert module.loss_scaler.passes == 1
    # an overflow in a microbatch skips the step
    huge = fxmem.optimize(model, "1GiB", allow=ALLOW, precision="fp16", microbatches=2,
                          loss_fn=_huge_loss, **EAGER)
    huge(*args, torch.tensor(1e30)).backward()
    assert all(p.grad is None for p in model.parameters())
    assert huge.loss_scaler.skipped == 1 and huge.loss_scaler.scale == 2.0 ** 15


def _grad_scaler_step(model, call, opt, scaler, args):
    """One step as torch.amp's recipe runs it; the unscaled gradients it stepped with."""
    loss = call(*args)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return loss.detach(), grads


def test_a_users_grad_scaler_works_with_loss_scaling_off():
    model, args, _ = make_tiny_gpt(**TINY)
    reference, _, _ = make_tiny_gpt(**TINY)
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    module = _fp16(model, optimizer=opt, loss_scaling="off")

    def eager(*a):
        with torch.autocast("cpu", dtype=FP16):
            return reference(*a)

    mine, theirs = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for _ in range(2):
        loss, grads = _grad_scaler_step(model, module, opt, mine, args)
        ref_loss, ref_grads = _grad_scaler_step(reference, eager, ref_opt, theirs, args)
        torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL, atol=0)
        assert _max_error(grads, ref_grads) < GRAD_NORM_RTOL
    assert module.loss_scaler is None  # fxmem scaled nothing
    assert "loss scaling: off (loss_scaling='off')" in module.plan.report()
    assert mine.get_scale() == theirs.get_scale() == 2.0 ** 16
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    # the user's GradScaler sees an overflow and skips, as in eager
    big = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)
    before = [p.detach().clone() for p in model.parameters()]
    _grad_scaler_step(model, module, opt, big, args)
    assert big.get_scale() == 2.0 ** 59
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_bf16_has_no_loss_scaling():
    model, args, _ = make_tiny_gpt(**TINY)
    module = fxmem.optimize(model, "1GiB", allow=ALLOW, precision="bf16", **EAGER)
    module(*args).backward()
    assert module.loss_scaler is None and "loss scaling" not in module.plan.report()


def test_bad_input_is_a_clear_error():
    model, _, _ = make_tiny_gpt(**TINY)
    assert ComputeCasts("cpu", FP16).dtype_name == "float16"
    with pytest.raises(ValueError, match="loss_scaling must be one of"):
        fxmem.optimize(model, "1GiB", loss_scaling="on")
    with pytest.raises(ValueError, match="allow it with allow"):
        fxmem.optimize(model, "1GiB", precision="fp16")
    with pytest.raises(ValueError, match="growth_factor must be above 1"):
        LossScaling(growth_factor=0.5)
    with pytest.raises(ValueError, match="backoff_factor must be in"):
        LossScaling(backoff_factor=1.0)
    with pytest.raises(ValueError, match="growth_interval must be a positive int"):
        LossScaling(growth_interval=0)
    with pytest.raises(ValueError, match="init_scale must be a finite number"):
        LossScaling(init_scale=float("inf"))
    with pytest.raises(TypeError, match="options must be a LossScaling"):
        LossScaler(model.parameters(), {"init_scale": 2.0})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch.autocast on 'cuda' does not run in float16"):
            ComputeCasts("cuda", FP16)


@pytest.mark.slow
def test_an_fp16_step_through_inductor_is_within_tolerance_and_scaled():
    model, args, _ = make_tiny_gpt(**TINY)
    expected = grads_of(model, model, *args)
    module = fxmem.optimize(model, "1GiB", allow=ALLOW, precision="fp16", time_limit=5.0)
    loss, grads = grads_of(model, module, *args)
    torch.testing.assert_close(loss, expected[0], rtol=LOSS_RTOL, atol=0)
    assert _max_error(grads, expected[1]) < GRAD_NORM_RTOL
    assert module.loss_scaler.passes == 1 and module.loss_scaler.skipped == 0


def _ddp_rank(rank: int, world: int, init_file: str, results: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        from fxmem.distributed import optimize_ddp

        # as tests/conftest.py does in pytest's processes: the imports' objects out of the
        # collector's walk (planning's kernel-scratch measurements each gc.collect())
        gc.collect()
        gc.freeze()
        model, (idx, tgt), _ = make_tiny_gpt(**TINY)  # the same weights and batch on each rank
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ddp = optimize_ddp(model, "1GiB", allow=ALLOW, precision="fp16", loss_fn=_huge_loss,
                           optimizer=opt, **EAGER)
        before = [p.detach().clone() for p in model.parameters()]
        rows = []
        for factor in ((1e30 if rank == 0 else 1.0), 1.0):  # rank 0 overflows, then neither
            ddp(idx, tgt, torch.tensor(factor)).backward()
            opt.step()
            opt.zero_grad()
            scaler = ddp.module.loss_scaler
            same = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            total = sum(float(p.detach().double().sum()) for p in model.parameters())
            rows.append(f"{rank} {int(same)} {scaler.scale} {scaler.skipped} {total!r}\n")
        with open(f"{results}.{rank}", "w") as f:
            f.writelines(rows)
        del ddp, scaler  # DDP's reducer let go while the process group lives: tearing it down
        gc.collect()  # on the function's return, after destroy_process_group, hung at times
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_one_ranks_overflow_skips_the_step_on_every_rank(tmp_path):
    """Rank 0's backward overflows, rank 1's does not: DDP's reduction carries the inf to rank
    1's gradients, and both ranks skip the step and halve the scale; the next step updates both
    alike."""
    init_file, results = str(tmp_path / "init"), str(tmp_path / "rank")
    ranks = mp.spawn(_ddp_rank, args=(2, init_file, results), nprocs=2, join=False)
    deadline = time.monotonic() + 300  # a stuck rank fails the test instead of hanging it
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two DDP ranks did not finish in 300 s")
    (a0, a1), (b0, b1) = ([line.split() for line in open(f"{results}.{r}")] for r in (0, 1))
    assert a0[1:4] == b0[1:4] == ["1", str(2.0 ** 15), "1"]  # unchanged, scale halved, skipped
    assert a1[1:4] == b1[1:4] == ["0", str(2.0 ** 15), "1"]  # updated
    assert a1[4] == b1[4] and math.isfinite(float(a1[4]))  # alike on both ranks
