"""The PyTorch Lightning recipe: a LightningModule compiled with the fxmem backend, its optimizer
made before the compile so that its state counts in the budget."""

import pytest
import torch
import torch._dynamo

import fxmem
from fxmem.api.backend import LAST_PLANS
from fxmem.memory.optimizer import optimizer_memory
from tests.helpers import make_tiny_gpt

L = pytest.importorskip("lightning")

TIME_LIMIT = 5  # seconds per solve


class GPTModule(L.LightningModule):
    """A tiny GPT; its AdamW is made in __init__ so that torch.compile's options can name it."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-3)

    def training_step(self, batch, batch_idx):  # no self.log: it would break the graph
        idx, targets = batch
        return self.net(idx, targets)

    def configure_optimizers(self):
        return self.optimizer

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Lightning zeroes the gradients inside its closure, after the next step's forward, so
        # they would live through that forward; fxmem's step frees them when the step ends
        self.optimizer.zero_grad(set_to_none=True)


def test_lightning_trains_a_compiled_module_under_the_budget_with_its_optimizer(tmp_path):
    net, (idx, targets), _ = make_tiny_gpt(vocab=256, seq=32, dropout=0.0)
    module = GPTModule(net)
    budget = int(0.85 * fxmem.optimize(net, "10GiB", optimizer=module.optimizer,
                                       lowering="eager", allow=("recompute",))
                 .plan_for(idx, targets).unoptimized_peak)
    batches = [(idx, targets)] * 3  # one batch, so one input signature
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    compiled = torch.compile(module, backend="fxmem", options={
        "budget": budget, "optimizer": module.optimizer, "lowering": "eager",
        "time_limit": TIME_LIMIT})
    before = net.lm_head.weight.detach().clone()
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    torch._dynamo.reset()
    try:  # the whole fit measured: the compile, AdamW's state made in the first step, 3 steps
        measured = fxmem.measure_memory(lambda: trainer.fit(compiled, loader), device="cpu",
                                        baseline=[module, batches])
    finally:
        torch._dynamo.reset()
    plan = LAST_PLANS.latest
    state = optimizer_memory(module.optimizer).state_bytes
    assert dict(plan.context.resident)["optimizer state"] == state > 0
    assert plan.budget == budget and plan.predicted_peak <= budget
    assert plan.solution.num_recomputed > 0
    assert trainer.global_step == 3 and module.optimizer.state  # AdamW stepped
    assert not torch.equal(net.lm_head.weight, before)
    assert measured.peak <= budget, (measured.peak, budget, plan.predicted_peak)
