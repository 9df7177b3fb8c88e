"""fxmem.optimizer_memory against the memory torch actually allocates in optimizer.step() (CPU)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fxmem.memory.optimizer import OptimizerMemory, optimizer_memory

O = torch.optim
# Scalar wrapper tensors (Python numbers wrapped for CPU kernels, the foreach step increment)
# are allocated on the CPU but not modelled: a few bytes each, a handful alive at once.
TOL = 256

SGD_CONFIGS = {
    "plain": {},
    "wd": {"weight_decay": 0.1},
    "maximize": {"maximize": True},
    "maximize-wd": {"maximize": True, "weight_decay": 0.1},
    "momentum": {"momentum": 0.9},
    "momentum-damp-wd": {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1},
    "momentum-maximize": {"momentum": 0.9, "maximize": True},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "nesterov-wd": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    "nesterov-maximize-wd": {"momentum": 0.9, "nesterov": True, "maximize": True,
                             "weight_decay": 0.1},
}
ADAM_CONFIGS = {
    "plain": {},
    "wd": {"weight_decay": 0.1},
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True},
    "maximize-wd": {"maximize": True, "weight_decay": 0.1},
    "amsgrad-maximize-wd": {"amsgrad": True, "maximize": True, "weight_decay": 0.1},
}
VARIANTS = {
    "single-tensor": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "default": {},  # foreach=None, fused=None: single-tensor on the CPU
}


def _model(dtypes=(torch.float32,), frozen: int | None = None) -> nn.Module:
    """~1.5 MB of float32 params in layers of different sizes (per dtype in ``dtypes``)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for dt in dtypes:
        layers += [nn.Linear(64, 256).to(dt), nn.Linear(256, 512).to(dt),
                   nn.Linear(512, 384).to(dt), nn.Linear(384, 64).to(dt)]
    model = nn.Sequential(*layers)
    if frozen is not None:
        model[frozen].requires_grad_(False)
    return model


def _backward(model: nn.Module) -> None:
    x = torch.randn(4, 64)
    for layer in model:
        x = layer(x.to(layer.weight.dtype))
    x.float().square().mean().backward()


def _measure(model: nn.Module, opt: O.Optimizer) -> tuple[int, int]:
    """(state bytes after one step, peak of extra bytes during the second step)."""
    _backward(model)
    opt.step()
    state = sum(v.nbytes for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor))
    opt.zero_grad()
    _backward(model)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())  # stable: equal stamps keep their recorded order
    running = peak = 0
    for e in events:  # nbytes() is signed: +size when allocated, -size when freed
        running += e.nbytes()
        peak = max(peak, running)
    assert running == 0, "step() should leave no temporaries behind"
    return state, peak


def _check(model: nn.Module, opt: O.Optimizer, **kw) -> OptimizerMemory:
    predicted = optimizer_memory(opt, **kw)
    state, peak = _measure(model, opt)
    assert predicted.state_bytes == state, predicted
    assert predicted.step_peak_bytes <= peak <= predicted.step_peak_bytes + TOL, (predicted, peak)
    return predicted


def _nbytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("config", SGD_CONFIGS)
def test_sgd_matches_measurement(config, variant):
    model = _model()
    opt = O.SGD(model.parameters(), lr=0.01, **SGD_CONFIGS[config], **VARIANTS[variant])
    mem = _check(model, opt)
    expected = {"foreach": "foreach", "fused": "fused"}.get(variant, "single-tensor")
    assert mem.name.endswith(f"({expected})")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("config", ADAM_CONFIGS)
@pytest.mark.parametrize("cls", [O.Adam, O.AdamW])
def test_adam_matches_measurement(cls, config, variant):
    model = _model()
    opt = cls(model.parameters(), lr=1e-3, **ADAM_CONFIGS[config], **VARIANTS[variant])
    mem = _check(model, opt)
    assert mem.name.startswith(cls.__name__)


def test_adam_decoupled_flag_matches_adamw():
    model = _model()
    opt = O.Adam(model.parameters(), weight_decay=0.1, decoupled_weight_decay=True)
    mem = _check(model, opt)
    assert mem.name == "Adam decoupled (single-tensor)"
    adamw = optimizer_memory(O.AdamW(_model().parameters(), weight_decay=0.1))
    assert (adamw.state_bytes, adamw.step_peak_bytes) == (mem.state_bytes, mem.step_peak_bytes)


@pytest.mark.parametrize("maximize", [False, True])
def test_adam_foreach_keeps_previous_dtype_groups_sqrt(maximize):
    # Two (device, dtype) groups: the first group's exp_avg_sq_sqrt list is still alive while the
    # second group's lists are allocated, so the peak is the sum of both groups, not the larger.
    model = _model((torch.float32, torch.float64))
    opt = O.Adam(model.parameters(), foreach=True, maximize=maximize)
    mem = _check(model, opt)
    assert mem.step_peak_bytes == _nbytes(model)


@pytest.mark.parametrize("dtypes", [
    (torch.float32, torch.float64, torch.bfloat16), (torch.bfloat16, torch.float16, torch.float64),
    (torch.float64, torch.float32, torch.float16, torch.bfloat16),
])
def test_adam_foreach_many_groups_follow_torchs_group_order(dtypes):
    model = _model(dtypes)
    _check(model, O.Adam(model.parameters(), foreach=True, maximize=True))
    # Meta params modelled on CUDA: the order is unknown, the two largest groups bound the peak.
    with torch.device("meta"):
        meta = _model(dtypes)
    mem = optimizer_memory(O.Adam(meta.parameters()), device="cuda")
    largest = sorted(_nbytes(_model((dt,))) for dt in dtypes)[-2:]
    assert mem == OptimizerMemory("Adam (foreach)", 2 * _nbytes(meta), sum(largest))


@pytest.mark.parametrize("variant", ["single-tensor", "foreach", "fused"])
def test_mixed_dtypes_sgd_and_adamw(variant):
    for make in (lambda ps: O.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, maximize=True,
                                  weight_decay=0.1, **VARIANTS[variant]),
                 lambda ps: O.AdamW(ps, amsgrad=True, maximize=True, **VARIANTS[variant])):
        model = _model((torch.float32, torch.float64))
        _check(model, make(model.parameters()))


def test_param_groups_with_different_settings():
    model = _model()
    opt = O.Adam([
        {"params": model[0].parameters(), "foreach": True, "weight_decay": 0.1},
        {"params": model[1].parameters(), "amsgrad": True, "maximize": True},
        {"params": list(model[2].parameters()) + list(model[3].parameters()), "fused": True},
    ])
    mem = _check(model, opt)
    assert mem.name == "Adam (foreach) + Adam (single-tensor) + Adam (fused)"


@pytest.mark.parametrize("cls", [O.SGD, O.Adam])
def test_has_grad_skips_params(cls):
    kw = {"lr": 0.1, "momentum": 0.9, "maximize": True} if cls is O.SGD else {"weight_decay": 0.1}
    model = _model(frozen=2)  # the largest layer gets no grad: no state, no temporaries
    opt = cls(model.parameters(), **kw)
    mem = _check(model, opt)  # default has_grad: p.requires_grad
    everything = optimizer_memory(opt, has_grad=lambda p: True)
    assert everything.state_bytes > mem.state_bytes
    assert everything.step_peak_bytes > mem.step_peak_bytes
    frozen = {id(p) for p in model[2].parameters()}
    assert optimizer_memory(opt, has_grad=lambda p: id(p) not in frozen) == mem


def test_meta_params_do_not_allocate(caplog):
    with torch.device("meta"):
        big = nn.Sequential(nn.Linear(50_000, 50_000), nn.Linear(50_000, 1_000))  # ~10 GB
    nbytes = _nbytes(big)
    opt = O.AdamW(big.parameters(), amsgrad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with caplog.at_level(logging.DEBUG, logger="fxmem.memory.optimizer"):
            on_meta = optimizer_memory(opt)
            on_cuda = optimizer_memory(opt, device=torch.device("cuda"))
    allocated = sum(max(e.nbytes(), 0) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    assert allocated < 4096
    assert not opt.state
    # sqrt + quotient of the largest weight (step counters live on the CPU, not on meta)
    assert on_meta == OptimizerMemory("AdamW (single-tensor)", 3 * nbytes,
                                      2 * 50_000 * 50_000 * 4)
    # CUDA defaults to foreach (one group: the sqrt list); step counters stay on the CPU.
    assert on_cuda == OptimizerMemory("AdamW (foreach)", 3 * nbytes, nbytes)
    assert "AdamW (foreach)" in caplog.text
    fused = optimizer_memory(O.AdamW(big.parameters(), fused=True), device="cuda")
    assert fused == OptimizerMemory("AdamW (fused)", 2 * nbytes + 4 * 4, 0)
    sgd = optimizer_memory(O.SGD(big.parameters(), momentum=0.9, maximize=True), device="cuda")
    assert sgd == OptimizerMemory("SGD momentum (foreach)", nbytes, nbytes)
    sgd = optimizer_memory(O.SGD(big.parameters(), momentum=0.9, fused=False), device="cuda")
    assert sgd.name == "SGD momentum (single-tensor)"  # fused=False alone disables the default


class _MyAdam(O.Adam):
    pass


@pytest.mark.parametrize("make", [
    lambda ps: O.Adagrad(ps), lambda ps: O.RMSprop(ps), lambda ps: _MyAdam(ps),
])
def test_unsupported_optimizers_raise(make):
    with pytest.raises(NotImplementedError, match="torch.optim.SGD, torch.optim.Adam"):
        optimizer_memory(make(_model().parameters()))


def test_unsupported_configurations_raise():
    with pytest.raises(NotImplementedError, match="complex"):
        optimizer_memory(O.Adam([nn.Parameter(torch.zeros(3, dtype=torch.complex64))]))
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(NotImplementedError, match="sparse"):
        optimizer_memory(O.SGD(emb.parameters(), lr=0.1))
    with pytest.raises(NotImplementedError, match="differentiable"):
        optimizer_memory(O.Adam(_model().parameters(), differentiable=True))
    with pytest.raises(NotImplementedError, match="capturable"):
        optimizer_memory(O.Adam(_model().parameters(), capturable=True))
    with pytest.raises(NotImplementedError, match="Tensor 'lr'"):
        optimizer_memory(O.SGD(_model().parameters(), lr=torch.tensor(0.1)))
