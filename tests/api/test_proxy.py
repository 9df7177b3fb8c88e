"""fxmem.OptimizedModule stands for the model: forward's signature, attributes, parameters and
state_dict keys are the model's (fxmem.api.proxy.ModelProxy)."""

import copy
import inspect

import pytest
import torch

import fxmem
from fxmem.api.proxy import unwrap
from fxmem.memory.optimizer import optimizer_memory

transformers = pytest.importorskip("transformers")


def _tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return BertForSequenceClassification(cfg)


def _optimized(model, budget="1GiB", **options):
    return fxmem.optimize(model, budget, lowering="eager", allow=("recompute",), **options)


def test_forward_signature_is_the_models():
    model = _tiny_bert()
    module = _optimized(model)
    assert inspect.signature(module.forward) == inspect.signature(model.forward)
    assert "labels" in inspect.signature(module.forward).parameters
    assert module.forward.__doc__ == model.forward.__doc__


def test_parameters_buffers_and_state_dict_keys_are_the_models():
    model = _tiny_bert()
    module = _optimized(model)
    assert list(module.state_dict()) == list(model.state_dict())
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(a is b for a, b in zip(module.parameters(), model.parameters()))
    assert [n for n, _ in module.named_buffers()] == [n for n, _ in model.named_buffers()]
    assert [n for n, _ in module.named_children()] == [n for n, _ in model.named_children()]
    assert module.bert is model.bert and module.module is model and unwrap(module) is model


def test_load_state_dict_loads_into_the_model():
    model, other = _tiny_bert(0), _tiny_bert(1)
    module = _optimized(model)
    result = module.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_nested_in_a_parent_module_keys_take_the_parents_prefix_alone():
    model = _tiny_bert()
    parent = torch.nn.ModuleDict({"net": _optimized(model)})
    keys = list(parent.state_dict())
    assert keys == [f"net.{k}" for k in model.state_dict()]
    other = _tiny_bert(1)
    parent.load_state_dict({f"net.{k}": v for k, v in other.state_dict().items()})
    assert torch.equal(model.classifier.weight, other.classifier.weight)


def test_attributes_come_from_the_model():
    model = _tiny_bert()
    module = _optimized(model)
    assert module.config is model.config and module.main_input_name == "input_ids"
    assert module.can_generate() is False and module.save_pretrained.__self__ is model
    assert "config" in dir(module)
    with pytest.raises(AttributeError):
        module.no_such_attribute


def test_train_eval_to_and_apply_reach_the_model():
    model = _tiny_bert()
    module = _optimized(model)
    module.eval()
    assert not model.training and not module.training and not model.bert.training
    module.train()
    assert model.training and module.training
    module.to(torch.float64)
    assert model.classifier.weight.dtype == torch.float64
    seen = []
    module.apply(seen.append)
    assert seen[-1] is model


def test_a_step_trains_the_shared_parameters_and_deepcopy_keeps_them_shared():
    model = _tiny_bert()
    module = _optimized(model)
    x, y = torch.randint(1, 128, (4, 16)), torch.randint(0, 2, (4,))
    out = module(input_ids=x, labels=y)
    out.loss.backward()
    assert type(out).__name__ == "SequenceClassifierOutput"
    assert model.classifier.weight.grad is not None
    twin = copy.deepcopy(module)
    assert twin.module is not model
    assert all(a is b for a, b in zip(twin.parameters(), twin.module.parameters()))


def test_setting_the_optimizer_counts_it_and_drops_the_plans_made():
    model = _tiny_bert()
    module = _optimized(model)
    x, y = torch.randint(1, 128, (4, 16)), torch.randint(0, 2, (4,))
    module(input_ids=x, labels=y).loss.backward()
    assert not module.plan.context.resident
    opt = torch.optim.AdamW(model.parameters())
    module.optimizer = opt
    assert module.optimizer is opt and not module.plans
    module(input_ids=x, labels=y).loss.backward()
    held = sum(dict(module.plan.context.resident).values())
    n_params = sum(p.numel() for p in model.parameters())
    assert held == optimizer_memory(opt).state_bytes >= 2 * 4 * n_params  # exp_avg(_sq), step
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        module.optimizer = "adamw"


def test_hf_trainer_keeps_the_dataset_columns_the_model_takes(tmp_path):
    from transformers import Trainer, TrainingArguments

    module = _optimized(_tiny_bert())
    trainer = Trainer(model=module, args=TrainingArguments(output_dir=str(tmp_path),
                                                           report_to=[]))
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)
