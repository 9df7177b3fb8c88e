"""The microbatch lever: batch analysis (batch dims, coupling, loss reduction) and its runtime."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxmem
import fxmem.graph.capture
from fxmem.levers.microbatch.analysis import analyze_batch
from fxmem.graph.capture import capture_step
from fxmem.errors import MicrobatchError, StepInputError
from fxmem.levers.microbatch.runtime import (MICROBATCH_COUPLING_OPTION, accumulated_gradient_bytes,
                              check_microbatchable,
                              microbatch_report, run_microbatched, split_sizes)
from fxmem.examples import WideResNet
from tests.helpers import make_tiny_gpt


# ---------------------------------------------------------------------------- split_sizes

@pytest.mark.parametrize("batch,k,sizes", [
    (10, 3, [4, 4, 2]), (5, 2, [3, 2]), (7, 3, [3, 3, 1]), (8, 4, [2, 2, 2, 2]), (4, 1, [4]),
    (4, 4, [1, 1, 1, 1]), (9, 4, [3, 2, 2, 2]), (10, 4, [3, 3, 3, 1]),
])
def test_split_sizes(batch, k, sizes):
    assert split_sizes(batch, k) == sizes
    assert sum(sizes) == batch and len(set(sizes)) <= 2


@pytest.mark.parametrize("batch,k", [(4, 0), (4, 5), (0, 1), (4, -1)])
def test_split_sizes_errors(batch, k):
    with pytest.raises(ValueError, match="batch|microbatches"):
        split_sizes(batch, k)


# ---------------------------------------------------------------------------- models

def small_gpt(batch=5, seq=8, dropout=0.0):
    # dropout p=0 for the tests of run_microbatched on the eager model: its dropout draws per
    # microbatch (fxmem.optimize's graphs read the whole batch's draws: test_exact_random.py)
    model, (idx, targets), _ = make_tiny_gpt(vocab=64, d_model=32, max_seq_len=16, seq=seq,
                                            batch=batch, dropout=dropout, targets="random")
    return model, idx, targets


def tiny_gpt2(batch=5, seq=8):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=96,
                                     bos_token_id=0, eos_token_id=0, use_cache=False,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).train()
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, 96, (batch, seq))
    labels = ids.clone()
    labels[0, 2:5] = -100
    labels[min(3, batch - 1), :] = -100  # a sample with no target at all
    labels[1, -1] = -100
    return model, ids, labels


class Centered(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x, y):
        x = x - x.mean(0)
        return F.cross_entropy(self.fc(x), y)


class Regression(nn.Module):
    """A mean squared error (reduction "mean") or a halved sum of squares (reduction "sum")."""

    def __init__(self, reduction):
        super().__init__()
        self.fc1, self.fc2, self.reduction = nn.Linear(6, 8), nn.Linear(8, 2), reduction

    def forward(self, x, y):
        err = self.fc2(torch.tanh(self.fc1(x))) - y
        if self.reduction == "mean":
            return (err ** 2).mean() / 2 + 0.01 * self.fc1.weight.square().sum()
        return (err ** 2).sum() * 0.5


class BNNet(nn.Module):
    def __init__(self, momentum=0.1):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.bn = nn.BatchNorm1d(8, momentum=momentum)

    def forward(self, x, y):
        return F.cross_entropy(self.fc2(F.relu(self.bn(self.fc1(x)))), y)


def regression_data(batch=7):
    torch.manual_seed(1)
    return torch.randn(batch, 6), torch.randn(batch, 2)


# ---------------------------------------------------------------------------- analysis

def test_gpt_analysis_finds_batch_dims_and_no_coupling():
    model, idx, targets = small_gpt(batch=8, seq=8, dropout=0.0)  # batch == seq: no confusion
    analysis = analyze_batch(capture_step(model, (idx, targets)))
    assert analysis.batch_size == 8
    assert dict(analysis.batch_dims) == {"args[0]": 0, "args[1]": 0}
    assert analysis.reduction in ("mean", "mean_over_targets")
    assert analysis.coupling == () and analysis.reason is None and analysis.exact
    assert analysis.output_batch_dims == ()
    assert float(analysis.weight_fn([idx[:3], targets[:3]])) == 3 * 8


def test_dropout_reads_the_whole_batchs_draws_unless_exact_random_is_off():
    """Dropout's masks are drawn once for the whole batch and read by the microbatches: exact,
    and the report says so. Without exact_random (Inductor's own generator) microbatches would
    draw other masks: not exact, so not done by default; accepted with
    microbatch_coupling="per-microbatch"."""
    model, idx, targets = small_gpt(batch=8, seq=8, dropout=0.1)
    step = capture_step(model, (idx, targets))
    analysis = analyze_batch(step)
    assert analysis.exact and analysis.coupling == () and len(analysis.draws) == 7
    check_microbatchable(analysis)
    notes = microbatch_report(analysis, (4, 4)).notes
    assert any("read the whole batch's values" in n for n in notes)
    analysis = analyze_batch(step, exact_random=False)
    assert not analysis.exact and {c.kind for c in analysis.coupling} == {"random"}
    with pytest.raises(MicrobatchError, match="draws random numbers"):
        check_microbatchable(analysis)
    check_microbatchable(analysis, allow_coupling=True)
    notes = microbatch_report(analysis, (4, 4)).notes
    assert any("draw per microbatch" in n for n in notes)


def test_hf_gpt2_mean_over_targets_weight_counts_shifted_targets():
    model, ids, labels = tiny_gpt2()
    analysis = analyze_batch(capture_step(model, (), {"input_ids": ids, "labels": labels}))
    assert analysis.input_paths == ("kwargs['input_ids']", "kwargs['labels']")
    assert analysis.reduction == "mean_over_targets" and analysis.exact
    assert analysis.output_batch_dims == (0,)  # the logits, held by the caller
    for rows in (slice(0, 5), slice(0, 2), slice(3, 4), slice(2, 5)):
        shifted = labels[rows, 1:]  # causal LM: position t predicts token t+1
        expected = (shifted != -100).sum().item()
        assert float(analysis.weight_fn([ids[rows], labels[rows]])) == expected
    assert float(analysis.weight_fn([ids[3:4], labels[3:4]])) == 0


def test_wide_resnet_batch_norm_coupling_names_source_line():
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=1, num_classes=3).train()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    analysis = analyze_batch(capture_step(model, (x, y)))
    bns = [c for c in analysis.coupling if c.kind == "batch_norm"]
    assert len(bns) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 7
    assert all(c.op == "aten.native_batch_norm" and c.momentum == 0.1 for c in bns)
    assert "wide_resnet.py:" in bns[0].source and "bn1" in bns[0].source
    assert not analysis.exact and "BatchNorm" in analysis.reason
    assert any(b.endswith("running_mean") for b in analysis.mutated_buffers)
    with pytest.raises(MicrobatchError) as err:
        run_microbatched(lambda *t: (model(*t),), [x, y], analysis=analysis, sizes=[2, 2],
                         params=list(model.parameters()))
    message = str(err.value)
    assert "wide_resnet.py:" in message and "native_batch_norm" in message
    assert MICROBATCH_COUPLING_OPTION in message and '"microbatch"' in message
    assert all(p.grad is None for p in model.parameters())


def test_mean_over_the_batch_in_the_forward_is_a_batch_reduction():
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    analysis = analyze_batch(capture_step(Centered(), (x, y)))
    (c,) = analysis.coupling
    assert c.kind == "batch_reduction" and c.op == "aten.mean" and "x.mean(0)" in c.source
    assert analysis.reduction == "mean_over_targets"  # the loss itself is fine
    assert not analysis.exact


class Mixer(nn.Module):
    """A linear layer, then ``mix(h)`` on the (batch, features) activations, then a mean loss."""

    def __init__(self, mix):
        super().__init__()
        self.fc, self.mix = nn.Linear(6, 6), mix

    def forward(self, x):
        return self.mix(self.fc(x)).square().mean()


@pytest.mark.parametrize("mix,kind", [
    (lambda h: h @ h.T, "batch_mixing"),  # every pair of samples
    (lambda h: h.T @ h, "batch_reduction"),  # contracts over the batch
    (lambda h: h.softmax(0), "batch_reduction"),
    (lambda h: h.cumsum(0), "batch_reduction"),
    (lambda h: h.flip(0), "batch_mixing"),
    (lambda h: h[1:], "batch_mixing"),
    (lambda h: h.reshape(2, -1), "batch_mixing"),  # (6, 6) -> (2, 18) splits samples apart
    (lambda h: h * torch.arange(h.shape[0])[:, None], "batch_mixing"),  # depends on position
    (lambda h: h[torch.arange(h.shape[0]), torch.arange(h.shape[0]) % 3], "batch_mixing"),
    (lambda h: torch.cat([h, h.roll(1, 0)], 1), "batch_mixing"),
    (lambda h: h - h.std(0), "batch_reduction"),
    (lambda h: torch.cdist(h, h), "unsupported_op"),  # unknown to the rules: refused
    # draws from probabilities it is given: no whole-batch draw to read, other draws per microbatch
    (lambda h: h + torch.bernoulli(torch.full_like(h, 0.5)), "random"),
])
def test_forwards_that_mix_samples_are_caught(mix, kind):
    analysis = analyze_batch(capture_step(Mixer(mix), (torch.randn(6, 6),)))
    assert kind in {c.kind for c in analysis.coupling} and not analysis.exact


@pytest.mark.parametrize("mix", [
    lambda h: h[torch.arange(h.shape[0]), h.argmax(1)],  # a per-sample gather
    lambda h: h.reshape(-1, 2, 3).transpose(1, 2).flatten(0, 1),  # samples stay whole
    lambda h: h.softmax(-1) * torch.ones(h.shape[0], 1) + torch.zeros_like(h),
    lambda h: h + torch.zeros_like(h).bernoulli_(0.5),  # the microbatches read the whole draw
])
def test_forwards_that_keep_samples_apart_are_exact(mix):
    analysis = analyze_batch(capture_step(Mixer(mix), (torch.randn(6, 6),)))
    assert analysis.exact and analysis.reduction == "mean", analysis.reason


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mean_and_sum_losses(reduction):
    x, y = regression_data()
    analysis = analyze_batch(capture_step(Regression(reduction), (x, y)))
    assert analysis.reduction == reduction and analysis.exact
    weight = float(analysis.weight_fn([x[:3], y[:3]]))
    assert weight == (3 * 2 if reduction == "mean" else 1)


@pytest.mark.parametrize("loss", [
    lambda out: out.amax(),
    lambda out: out.mean() ** 2,
    lambda out: out.sum() + 1.0,  # a sum plus a constant: each microbatch would add it again
    lambda out: out.sum() / out.shape[0],  # the batch size, baked in: microbatches use theirs
    lambda out: out.mean() * out.numel(),
])
def test_loss_that_cannot_be_split(loss):
    fc = nn.Linear(6, 2)
    x = torch.randn(4, 6)
    analysis = analyze_batch(capture_step(fc, (x,), loss_fn=lambda m, x: loss(m(x))))
    assert analysis.reduction is None and analysis.reason and not analysis.exact
    with pytest.raises(MicrobatchError, match="cannot split"):
        run_microbatched(lambda t: (loss(fc(t)),), [x], analysis=analysis, sizes=[2, 2],
                         params=list(fc.parameters()), allow_coupling=True)


def test_batch_dims_overrides_and_errors():
    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, y, scale):  # x: (T, B, 4), y: (B,), scale: (T,) not batched
            return F.cross_entropy(self.fc((x * scale[:, None, None]).mean(0)), y)

    x, y, scale = torch.randn(5, 3, 4), torch.randint(0, 3, (3,)), torch.rand(5)
    step = capture_step(TimeMajor(), (x, y, scale))
    analysis = analyze_batch(step, {"args[0]": 1})
    assert analysis.batch_size == 3
    assert dict(analysis.batch_dims) == {"args[0]": 1, "args[1]": 0, "args[2]": None}
    assert analysis.exact
    default = analyze_batch(step)  # dim 0 of the first input (time) is taken for the batch
    assert default.batch_size == 5 and not default.exact
    with pytest.raises(StepInputError, match="unknown inputs"):
        analyze_batch(step, {"args[7]": 0})
    with pytest.raises(StepInputError, match="out of range"):
        analyze_batch(step, {"args[0]": 3})
    with pytest.raises(StepInputError, match="disagree"):
        analyze_batch(step, {"args[0]": 1, "args[2]": 0})


# ---------------------------------------------------------------------------- exactness

def whole_batch(model, call):
    for p in model.parameters():
        p.grad = None
    loss = call()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return loss.detach(), grads


def assert_microbatched_equal(model, analysis, fn, tensors, sizes, expected):
    params = list(model.parameters())
    loss, held = run_microbatched(fn, tensors, analysis=analysis, sizes=sizes, params=params)
    assert all(p.grad is None for p in params)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected[0], rtol=1e-5, atol=1e-6)
    for p, g in zip(params, expected[1]):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    for p in params:
        p.grad = None
    return held


@pytest.mark.parametrize("batch,k", [(4, 2), (4, 4), (5, 2), (7, 3)])
def test_gpt_microbatched_equals_whole_batch(batch, k):
    model, idx, targets = small_gpt(batch=batch)
    targets[0, :5] = -100
    analysis = analyze_batch(capture_step(model, (idx, targets)))
    expected = whole_batch(model, lambda: model(idx, targets))
    assert_microbatched_equal(model, analysis, lambda i, t: (model(i, t),), [idx, targets],
                              split_sizes(batch, k), expected)


@pytest.mark.parametrize("batch,k", [(4, 2), (5, 2), (7, 3), (5, 5)])
def test_hf_gpt2_microbatched_equals_whole_batch(batch, k):
    model, ids, labels = tiny_gpt2(batch=batch)
    analysis = analyze_batch(capture_step(model, (), {"input_ids": ids, "labels": labels}))
    expected = whole_batch(model, lambda: model(input_ids=ids, labels=labels).loss)
    with torch.no_grad():
        logits = model(input_ids=ids, labels=labels).logits

    def fn(input_ids, labels):
        out = model(input_ids=input_ids, labels=labels)
        return out.loss, out.logits.detach()

    (held,) = assert_microbatched_equal(model, analysis, fn, [ids, labels], split_sizes(batch, k),
                                        expected)
    torch.testing.assert_close(held, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mean_and_sum_losses_microbatched_equal_whole_batch(reduction):
    model, (x, y) = Regression(reduction), regression_data(7)
    analysis = analyze_batch(capture_step(model, (x, y)))
    expected = whole_batch(model, lambda: model(x, y))
    assert_microbatched_equal(model, analysis, lambda a, b: (model(a, b),), [x, y], [3, 3, 1],
                              expected)


class TimeMajorAttention(nn.Module):
    """(T, B, C) inputs: nn.MultiheadAttention reshapes them to (T, B*heads, d) and (T*B, C)."""

    def __init__(self):
        super().__init__()
        self.attn, self.gru = nn.MultiheadAttention(8, 2), nn.GRU(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, y):  # x: (T, B, 8), y: (B,)
        h, _ = self.attn(x, x, x, need_weights=False)
        h, _ = self.gru(h)
        return F.cross_entropy(self.head(h[-1]), y)


def test_time_major_attention_microbatched_equals_whole_batch():
    torch.manual_seed(0)
    model, x, y = TimeMajorAttention(), torch.randn(4, 5, 8), torch.randint(0, 3, (5,))
    analysis = analyze_batch(capture_step(model, (x, y)), {"args[0]": 1})
    assert analysis.exact and dict(analysis.batch_dims) == {"args[0]": 1, "args[1]": 0}
    expected = whole_batch(model, lambda: model(x, y))
    assert_microbatched_equal(model, analysis, lambda a, b: (model(a, b),), [x, y], [3, 2],
                              expected)


# ---------------------------------------------------------------------------- backward semantics

def test_backward_semantics():
    model, (x, y) = Regression("mean"), regression_data(6)
    params = list(model.parameters())
    analysis = analyze_batch(capture_step(model, (x, y)))
    _, grads = whole_batch(model, lambda: model(x, y))
    run = lambda: run_microbatched(lambda a, b: (model(a, b),), [x, y], analysis=analysis,
                                   sizes=[3, 3], params=params)[0]
    loss = run()
    assert loss.requires_grad and all(p.grad is None for p in params)
    del loss  # never backpropagated: nothing touches .grad
    assert all(p.grad is None for p in params)

    loss = run()
    loss.backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g)
    with pytest.raises(RuntimeError, match="delivers its gradients once"):
        loss.backward()

    loss = run()  # accumulates into existing .grad, like PyTorch
    loss.backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, 2 * g)

    for p in params:
        p.grad = None
    (run() * 0.5).backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, 0.5 * g)
    for p in params:
        p.grad = None
    loss = run()
    loss.mul_(0.5)  # scaled in place before its backward (the HF Trainer does)
    loss.backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, 0.5 * g)
    assert accumulated_gradient_bytes(params) == sum(p.numel() * 4 for p in params)


# ---------------------------------------------------------------------------- BatchNorm

@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_per_microbatch_with_one_running_update(momentum):
    torch.manual_seed(0)
    model = BNNet(momentum).train()
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(8))
        model.bn.running_var.copy_(torch.rand(8) + 0.5)
        model.bn.num_batches_tracked.fill_(3)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    sizes = [4, 4, 2]
    reference = copy.deepcopy(model)
    r_mean, r_var = model.bn.running_mean.clone(), model.bn.running_var.clone()
    # momentum=None reads float(num_batches_tracked): not capturable as one graph; the runtime's
    # buffer rule is the same, so analyse a twin with a momentum (the graph is otherwise equal)
    twin = model if momentum is not None else BNNet(0.1).train()
    analysis = analyze_batch(capture_step(twin, (x, y)))
    assert [c.kind for c in analysis.coupling] == ["batch_norm"]
    assert set(analysis.mutated_buffers) == {"bn.running_mean", "bn.running_var",
                                             "bn.num_batches_tracked"}
    fn = lambda a, b: (model(a, b),)
    with pytest.raises(MicrobatchError, match="per-microbatch"):
        run_microbatched(fn, [x, y], analysis=analysis, sizes=sizes,
                         params=list(model.parameters()))

    buffers = [model.get_buffer(n) for n in analysis.mutated_buffers]
    loss, _ = run_microbatched(fn, [x, y], analysis=analysis, sizes=sizes,
                               params=list(model.parameters()), buffers=buffers,
                               allow_coupling=True)
    # by hand: the statistics BatchNorm sees in each microbatch (unbiased variance for running_var)
    means, variances, losses = [], [], []
    start = 0
    for n in sizes:
        xs, ys = x[start:start + n], y[start:start + n]
        with torch.no_grad():
            h = reference.fc1(xs)
            means.append(h.mean(0))
            variances.append(h.var(0, unbiased=True))
            ref = copy.deepcopy(reference)  # fresh running statistics for each microbatch
            losses.append(ref(xs, ys) * n / 10)
        start += n
    m = momentum if momentum is not None else 1 / 4  # cumulative average: 1 / (3 + 1)
    mean = sum(n / 10 * s for n, s in zip(sizes, means))
    var = sum(n / 10 * s for n, s in zip(sizes, variances))
    torch.testing.assert_close(model.bn.running_mean, (1 - m) * r_mean + m * mean)
    torch.testing.assert_close(model.bn.running_var, (1 - m) * r_var + m * var)
    assert int(model.bn.num_batches_tracked) == 4  # one update per step, not k
    torch.testing.assert_close(loss.detach(), sum(losses))
    report = str(microbatch_report(analysis, sizes))
    assert "per-microbatch statistics (k=3" in report and "once per step" in report
    assert "momentum 0.1" in report
