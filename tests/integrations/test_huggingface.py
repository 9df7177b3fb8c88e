"""The Hugging Face Trainer recipe: default TrainingArguments, the Trainer's AdamW counted in the
budget, the measured peak under it, and save_model/from_pretrained giving the trained model."""

import pytest
import torch

import fxmem
from fxmem.memory.optimizer import optimizer_memory

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig, BertForSequenceClassification, Trainer, TrainingArguments, default_data_collator)

from fxmem.integrations.huggingface import (  # noqa: E402
    FxmemCallback, optimize_trainer, trainer_optimizer)

OPTIONS = {"lowering": "eager", "allow": ("recompute",), "time_limit": 5}
SEQ, BATCH = 64, 8


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=256, max_position_embeddings=SEQ)
    return BertForSequenceClassification(cfg)


def _dataset(n=32):
    """In-memory examples as a tokenizer gives them, with a column the model does not take."""
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 512, (SEQ,), generator=g),
             "attention_mask": torch.ones(SEQ, dtype=torch.long),
             "labels": torch.tensor(i % 2), "text": f"example {i}"} for i in range(n)]


def _trainer(model, tmp_path, **args):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH,
                             report_to=[], save_strategy="no", disable_tqdm=True, **args)
    return Trainer(model=model, args=args, train_dataset=_dataset())


def _budget(model, trainer, fraction=0.8):
    """``fraction`` of the step's unoptimised peak, the Trainer's AdamW counted (0.8: a plan
    that recomputes, found in one solve; 0.6 of it takes a floor search)."""
    batch = default_data_collator([{k: v for k, v in ex.items() if k != "text"}
                                   for ex in _dataset()[:BATCH]])
    trainer.create_optimizer()  # the optimizer train() will use (it creates none when one is set)
    optimizer = trainer_optimizer(trainer.optimizer)
    top = fxmem.optimize(model, "10GiB", optimizer=optimizer, **OPTIONS).plan_for(**batch)
    return int(fraction * top.unoptimized_peak), top.unoptimized_peak


def test_trainer_trains_under_the_budget_with_its_adamw_counted_and_saves_the_model(tmp_path):
    model = _bert()
    trainer = _trainer(model, tmp_path, max_steps=1)
    budget, unoptimized = _budget(model, trainer)
    module = optimize_trainer(trainer, budget, **OPTIONS)
    assert trainer.model is model and trainer.model_wrapped is module
    before = model.classifier.weight.detach().clone()
    trainer.train()  # plans the step and makes AdamW's state: both before measuring
    trainer.args.max_steps = 3  # steady-state steps measured, AdamW's state held from the start
    measured = fxmem.measure_memory(trainer.train, device="cpu", baseline=[model,
                                                                             trainer.optimizer])
    plan = module.plan
    state = optimizer_memory(trainer_optimizer(trainer.optimizer)).state_bytes
    assert module.optimizer is trainer_optimizer(trainer.optimizer)
    assert dict(plan.context.resident)["optimizer state"] == state > 0
    assert len(module.plans) == 1 and plan.budget == budget and plan.solution.num_recomputed > 0
    assert plan.predicted_peak <= budget < unoptimized
    assert measured.peak <= budget, (measured.peak, budget, plan.predicted_peak)
    assert not torch.equal(model.classifier.weight, before)  # fxmem's steps trained it

    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "config.json").exists()
    loaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    model.eval(), loaded.eval()
    x = torch.randint(1, 512, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_optimize_trainer_refuses_what_it_cannot_train(tmp_path):
    model = _bert()
    with pytest.raises(ValueError, match="pass the model itself"):
        optimize_trainer(_trainer(fxmem.optimize(model, "1GiB", **OPTIONS), tmp_path), "1GiB")
    with pytest.raises(ValueError, match="Trainer's own optimizer"):
        optimize_trainer(_trainer(model, tmp_path), "1GiB",
                         optimizer=torch.optim.SGD(model.parameters()))
    with pytest.raises(NotImplementedError, match="auto_find_batch_size"):
        optimize_trainer(_trainer(model, tmp_path, auto_find_batch_size=True), "1GiB")
    with pytest.raises(TypeError, match="OptimizedModule"):
        FxmemCallback(model)


def test_optimize_trainer_again_replaces_the_module_and_its_callback(tmp_path):
    trainer = _trainer(_bert(), tmp_path)
    first = optimize_trainer(trainer, "1GiB", **OPTIONS)
    second = optimize_trainer(trainer, "2GiB", **OPTIONS)
    assert trainer.model_wrapped is second is not first
    callbacks = [c for c in trainer.callback_handler.callbacks if isinstance(c, FxmemCallback)]
    assert len(callbacks) == 1 and callbacks[0].module is second


@pytest.mark.slow
def test_trainer_with_fxmems_defaults_microbatches_a_llama(tmp_path):
    """fxmem's defaults (recompute and microbatch) under the Trainer, at half the step's
    unoptimised peak (its AdamW counted): the plan splits the batch, and the Trainer's in-place
    scaling of the microbatched loss before its backward works."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 256, (SEQ,), generator=g) for _ in range(16)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH,
                             report_to=[], save_strategy="no", disable_tqdm=True, max_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    batch = default_data_collator(data[:BATCH])
    trainer.create_optimizer()
    top = fxmem.optimize(model, "10GiB", lowering="eager", optimizer=trainer_optimizer(
        trainer.optimizer)).plan_for(**batch).unoptimized_peak
    budget = top // 2
    module = optimize_trainer(trainer, budget, lowering="eager", time_limit=5)
    result = trainer.train()
    plan = module.plan
    assert plan.microbatch is not None and len(plan.microbatch.sizes) > 1
    assert plan.context.constant["optimizer state"] > 0  # the Trainer's AdamW
    assert plan.predicted_peak <= budget
    assert torch.isfinite(torch.tensor(result.training_loss))
