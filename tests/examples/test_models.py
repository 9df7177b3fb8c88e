"""Fast tests for the reference models and the benchmark workload factories."""

import pytest
import torch

from bench.workloads import WORKLOADS, decoder_1b
from fxmem.examples import demo_workload
from fxmem.examples import GPT, GPTConfig, WideResNet, wide_resnet_28_2

TINY = dict(vocab_size=64, n_layer=2, n_head=2, d_model=16, max_seq_len=12)


def _tiny_gpt(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def _tokens(batch=3, seq=10, vocab=TINY["vocab_size"], device=None):
    return torch.randint(0, vocab, (batch, seq), device=device)


# ----------------------------------------------------------------------------- GPT


def test_gpt_logits_shape_and_scalar_loss():
    model = _tiny_gpt().train()
    idx, targets = _tokens(), _tokens()
    logits = model(idx)
    assert logits.shape == (3, 10, TINY["vocab_size"])
    loss = model(idx, targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # Freshly initialised: loss near ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 1.0


def test_gpt_loss_is_mean_token_cross_entropy():
    model = _tiny_gpt().eval()
    idx, targets = _tokens(), _tokens()
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model(idx, targets), expected)


def test_gpt_is_causal():
    model = _tiny_gpt().eval()
    idx = _tokens(batch=1)
    changed = idx.clone()
    changed[0, -1] = (changed[0, -1] + 1) % TINY["vocab_size"]
    torch.testing.assert_close(model(idx)[:, :-1], model(changed)[:, :-1])


def test_gpt_backward_fills_all_grads():
    model = _tiny_gpt().train()
    model(_tokens(), _tokens()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.shape == p.shape
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2


def test_gpt_tied_weights_share_storage():
    model = _tiny_gpt()
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    # Tied parameter counted once.
    n_unique = sum(p.numel() for p in model.parameters())
    assert n_unique == model.num_parameters()
    untied = _tiny_gpt(tie_weights=False)
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_parameters() == n_unique + TINY["vocab_size"] * TINY["d_model"]


def test_gpt_no_bias():
    model = _tiny_gpt(bias=False)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    model(_tokens(), _tokens()).backward()


def test_gpt_on_meta_device():
    with torch.device("meta"):
        model = GPT(GPTConfig(**TINY)).train()
        idx, targets = _tokens(), _tokens()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert idx.device.type == "meta"
    loss = model(idx, targets)
    assert loss.device.type == "meta" and loss.shape == ()
    logits = model(idx)
    assert logits.device.type == "meta" and logits.shape == (3, 10, TINY["vocab_size"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(d_model=18, n_head=4), "divisible"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_gpt_invalid_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**TINY, **overrides})


def test_gpt_sequence_too_long():
    model = _tiny_gpt()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(seq=TINY["max_seq_len"] + 1))
    model(_tokens(seq=TINY["max_seq_len"]))  # exactly max_seq_len is fine


def test_gpt_config_is_frozen():
    cfg = GPTConfig(**TINY)
    with pytest.raises(Exception):
        cfg.n_layer = 3


# ---------------------------------------------------------------------- WideResNet


def test_wrn_28_2_parameter_count():
    n = sum(p.numel() for p in wide_resnet_28_2().parameters())
    assert 1_400_000 < n < 1_600_000


def test_wrn_on_8x8_single_channel():
    torch.manual_seed(0)
    model = wide_resnet_28_2(num_classes=10, in_channels=1).train()
    x = torch.randn(4, 1, 8, 8)
    assert model(x).shape == (4, 10)
    loss = model(x, torch.randint(0, 10, (4,)))
    assert loss.dim() == 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_wrn_no_inplace_relu():
    model = wide_resnet_28_2()
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)


@pytest.mark.parametrize("depth", [27, 30, 4])
def test_wrn_invalid_depth(depth):
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=depth)


# ----------------------------------------------------------------------- Workloads


def _check_workload(w, name):
    assert set(w) >= {"model", "args", "kwargs", "name"}
    assert w["name"] == name
    assert isinstance(w["args"], tuple) and isinstance(w["kwargs"], dict)
    model = w["model"]
    assert model.training
    out = model(*w["args"], **w["kwargs"])
    loss = out if isinstance(out, torch.Tensor) else out.loss
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())
    return loss


_SMALL = {
    "gpt_decoder": dict(batch=2, seq=16),
    "wrn_28_2": dict(batch=2),
    "hf_gpt2": dict(batch=2, seq=16),
}


def test_workloads_registry():
    assert set(WORKLOADS) == {"gpt_decoder", "wrn_28_2", "hf_gpt2"}


@pytest.mark.parametrize("name", sorted(_SMALL))
def test_workload_builds_and_steps(name):
    if name == "hf_gpt2":
        pytest.importorskip("transformers")
    _check_workload(WORKLOADS[name](**_SMALL[name]), name)


def test_workloads_are_seeded():
    a, b = WORKLOADS["gpt_decoder"](batch=2, seq=16), WORKLOADS["gpt_decoder"](batch=2, seq=16)
    assert torch.equal(a["args"][0], b["args"][0])
    assert torch.equal(a["model"].tok_emb.weight, b["model"].tok_emb.weight)


def test_decoder_1b_on_meta():
    w = decoder_1b(batch=1, seq=32)
    model = w["model"]
    assert all(p.device.type == "meta" for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert 1.0e9 <= n <= 1.35e9
    loss = model(*w["args"])
    assert loss.device.type == "meta" and loss.shape == ()


def test_demo_workload():
    w = demo_workload()
    assert isinstance(w["optimizer"], torch.optim.Adam)
    loss = _check_workload(w, "demo")
    w["optimizer"].step()
    assert loss.item() > 0
