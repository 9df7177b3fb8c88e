"""fxmem.estimate against the allocator: predicted and measured peaks of real (small) steps agree."""

import gc

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxmem
from fxmem import Workload
from fxmem.examples import wide_resnet_28_2
from tests.helpers import make_tiny_gpt

TOLERANCE = 0.01  # the bench holds 5% on the full workloads; small steps must do better
# oneDNN's CPU convolution_backward allocates reorder buffers (about grad_output + input) through
# the allocator inside the op; the model does not see them. In a tiny WRN the step's peak falls
# inside a convolution_backward, so they show (-2% measured); at bench size they do not (-0.24%).
CONV_TOLERANCE = 0.05


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)
        self.drop = nn.Dropout(0.2)

    def forward(self, x, y):
        h = self.drop(F.gelu(self.fc1(x)))
        h = self.drop(F.relu(self.fc2(h))) + h
        return F.cross_entropy(self.fc3(h), y)


def mlp():
    torch.manual_seed(0)
    return dict(model=MLP(), args=(torch.randn(512, 64), torch.randint(0, 10, (512,))))


def tiny_gpt():
    model, args, _ = make_tiny_gpt()  # the tests' tiny GPT (conftest's tiny_gpt fixture)
    return dict(model=model, args=args)


def tiny_wrn():
    torch.manual_seed(0)
    return dict(model=wide_resnet_28_2(num_classes=10), args=(torch.randn(8, 3, 16, 16),
                                                              torch.randint(0, 10, (8,))))


def tiny_hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=1000,
                                     use_cache=False, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).train()
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, 1000, (4, 64))
    return dict(model=model, kwargs={"input_ids": ids, "labels": ids})


OPTIMIZERS = {
    None: None,
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("factory", [mlp, tiny_gpt, tiny_wrn, tiny_hf_gpt2])
def test_predicted_peak_matches_measured(factory, optimizer):
    workload = Workload.from_factory_result(factory(), name=factory.__name__)
    if optimizer is not None:
        workload.optimizer = OPTIMIZERS[optimizer](workload.model.parameters())
    est = workload.estimate()
    measured = workload.measure(warmup=1)
    assert measured.peak > measured.start > 0
    tolerance = CONV_TOLERANCE if factory is tiny_wrn else TOLERANCE
    assert est.peak == pytest.approx(measured.peak, rel=tolerance), est.report()
    # the breakdown adds up, and the resident parts are exactly what the model holds
    assert sum(est.breakdown().values()) == est.peak
    params = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    assert est.breakdown()["parameters"] == params
    if optimizer == "adam":
        assert est.breakdown()["optimizer state"] >= 2 * params


def test_estimate_does_not_run_the_step():
    torch.manual_seed(0)
    model = MLP()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
    gc.collect()
    measured = fxmem.measure_memory(lambda: fxmem.estimate(model, x, y))
    est = measured.result
    # tracing on fake tensors allocates next to nothing: far less than the step's activations
    assert measured.peak - measured.start < (est.peak - est.breakdown()["parameters"]) / 4
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_estimate_of_a_meta_model_equals_the_cpu_one_and_reports():
    cpu = Workload.from_factory_result(tiny_gpt())
    with torch.device("meta"):
        meta = Workload.from_factory_result(tiny_gpt())
    for w in (cpu, meta):
        w.optimizer = torch.optim.AdamW(w.model.parameters())
    est, est_cpu = meta.estimate(), cpu.estimate()
    assert est.device.type == "meta" and est.peak > 0
    # the same trace, but AdamW's `step` scalars live on the CPU: they count only there
    step_scalars = 4 * len(list(cpu.model.parameters()))
    assert est_cpu.peak - est.peak == step_scalars
    assert est_cpu.optimizer.state_bytes - est.optimizer.state_bytes == step_scalars
    assert {k: v for k, v in est.breakdown().items() if k != "optimizer state"} == \
        {k: v for k, v in est_cpu.breakdown().items() if k != "optimizer state"}
    text = est.report()
    assert "predicted peak" in text and "optimizer state" in text and "AdamW" in text
    assert est.peak_phase in {"forward", "backward", "optimizer"}


def test_estimate_rejects_a_foreign_optimizer():
    workload = Workload.from_factory_result(mlp())
    other = torch.optim.SGD(MLP().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not parameters of the model"):
        fxmem.estimate(workload.model, *workload.args, optimizer=other)


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_estimate_with_a_lowering_is_the_plans_unoptimised_step(lowering):
    """``estimate(..., lowering=L)`` predicts fxmem's own unoptimised step: the peak a plan with
    lowering L reports as unoptimised, to the byte, with the optimizer counted alike; planning
    does not run the step (``plan_for``), and ``fxmem.floor`` is under that peak and plans."""
    w = tiny_gpt()
    model, args = w["model"], w["args"]
    opt = torch.optim.AdamW(model.parameters())
    est = fxmem.estimate(model, *args, optimizer=opt, lowering=lowering)
    floor = fxmem.floor(model, *args, optimizer=opt, lowering=lowering, time_limit=5,
                        allow=("recompute",))
    assert floor < est.peak
    # the floor is found by time-limited (wall-clock) solves, so a plan at it is not certain; 5%
    # over it is, even on a loaded machine (3% once missed by 10 KiB there: "about 3.43 MiB").
    # The plan recomputes (under the peak): its unoptimised step is the one it started from
    budget = int(1.05 * floor)
    module = fxmem.optimize(model, budget, optimizer=opt, lowering=lowering, time_limit=5,
                            allow=("recompute",))
    plan = module.plan_for(*args)
    assert plan.predicted_peak <= budget < est.peak
    assert est.peak == plan.unoptimized_peak
    assert est.breakdown()["optimizer state"] == plan.timeline.breakdown()["optimizer state"] > 0
    with pytest.raises(RuntimeError, match="no plan yet"):
        module.plan  # plan_for leaves the module unplanned
