"""Hugging Face GPT-2's linear layers (``transformers`` ``Conv1D``, weight stored (in, out)) are
sparsified like ``nn.Linear``: forward and gradients equal the masked dense layer's, a sparsified
GPT-2 trains through ``fxmem.optimize(..., allow=(..., "sparse"))`` with the user's optimizer,
and ``fxmem.to_dense`` exports ``Conv1D`` layers back (Hugging Face's state_dict layout)."""

import copy

import pytest
import torch

import fxmem
from fxmem.levers.sparse import sparsify, to_dense
from fxmem.levers.sparse.layers import SparseHFConv1D

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D


def _tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=32,
                                     vocab_size=128, use_cache=False, attn_pdrop=0.0,
                                     resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).train()
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, 128, (2, 32))
    return model, dict(input_ids=ids, labels=ids)


def test_a_sparse_conv1d_equals_the_masked_dense_conv1d():
    torch.manual_seed(0)
    layer = Conv1D(48, 32)  # nf=48 outputs, nx=32 inputs: weight (32, 48)
    weight_t = layer.weight.detach().t()
    idx = torch.topk(weight_t.reshape(-1).abs(), 300).indices.sort().values
    sparse = SparseHFConv1D.from_dense(layer, idx)
    mask = torch.zeros(weight_t.numel(), dtype=torch.bool)
    mask[idx] = True
    masked = copy.deepcopy(layer)
    with torch.no_grad():
        masked.weight.mul_(mask.view(48, 32).t())
    x = torch.randn(4, 7, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(sparse(x), masked(x2))
    sparse(x).square().sum().backward()
    masked(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(sparse.values.grad,
                               masked.weight.grad.t().reshape(-1)[idx])
    dense = sparse.to_dense_module()
    assert isinstance(dense, Conv1D) and dense.weight.shape == layer.weight.shape
    torch.testing.assert_close(dense(x2.detach()), masked(x2.detach()))


def test_gpt2_is_sparsified_trains_under_fxmem_and_exports_back_dense():
    model, kwargs = _tiny_gpt2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimized = fxmem.optimize(model, "1GiB", optimizer=opt, allow=("recompute", "sparse"),
                               sparse_density=0.2, lowering="eager", time_limit=5)
    optimized(**kwargs).loss.backward()
    opt.step()
    opt.zero_grad()
    layers = [m for m in model.modules() if isinstance(m, SparseHFConv1D)]
    assert len(layers) >= 6  # c_attn, c_proj, c_fc, c_proj per block, less the first and last
    assert optimized.plan.sparsity is not None
    stepped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(m.values) in stepped for m in layers)
    assert all(m.values.grad is None for m in layers)  # zero_grad reached the values
    with torch.no_grad():
        before = model(**kwargs).logits
    dense = to_dense(copy.deepcopy(model))
    assert not any(isinstance(m, SparseHFConv1D) for m in dense.modules())
    assert sum(isinstance(m, Conv1D) for m in dense.modules()) == 4 * 2
    with torch.no_grad():
        torch.testing.assert_close(dense(**kwargs).logits, before)


def test_sparsify_reaches_gpt2s_conv1d_layers():
    model, _ = _tiny_gpt2()
    sparsify(model, 0.3)
    names = [n for n, m in model.named_modules() if isinstance(m, SparseHFConv1D)]
    assert names and all(n.endswith(("c_attn", "c_proj", "c_fc")) for n in names)


def test_the_hf_trainer_trains_gpt2_sparsified_by_the_lever(tmp_path):
    from fxmem.integrations.huggingface import optimize_trainer

    model, _ = _tiny_gpt2()
    data = []
    for _ in range(8):
        ids = torch.randint(0, 128, (32,))
        data.append({"input_ids": ids, "labels": ids.clone()})
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          max_steps=2, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    module = optimize_trainer(trainer, "1GiB", allow=("recompute", "sparse"), sparse_density=0.2,
                              lowering="eager", time_limit=5)
    trainer.train()
    layers = [m for m in trainer.model.modules() if isinstance(m, SparseHFConv1D)]
    assert len(layers) == 8 and module.plan.sparsity is not None
    stepped = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(m.values) in stepped for m in layers)  # the Trainer's AdamW steps the values
