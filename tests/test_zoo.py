"""A model zoo from Hugging Face configs (no downloads): planning never fails internally.

Every architecture plans with ``allow=("recompute",)`` at ``budget=1`` (a BudgetError with its
floor), at 1.05x that floor and at two budgets between the floor and the eager peak; each plan's
measured peak is within its budget and its gradients are eager's (dropout included, same seed).
HF Llama with its default cache and BERT (dropout included) are split into microbatches exactly."""

import dataclasses

import pytest
import torch

import fxmem
from tests.helpers import EAGER_RECOMPUTE, assert_same_grads, grads_of, measured_step_peak

transformers = pytest.importorskip("transformers")

VOCAB, BATCH, SEQ = 128, 2, 16
TIME_LIMIT = 1.0  # seconds per ILP solve: these problems are small


def _ids(n=VOCAB, shape=(BATCH, SEQ)):
    return torch.randint(0, n, shape)


def _decoder(config_cls, model_cls, **extra):
    def build(dropout, batch):  # these decoders have no dropout by default
        config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                            attn_implementation="sdpa", **extra)
        ids = _ids(shape=(batch, SEQ))
        return model_cls(config), {"input_ids": ids, "labels": ids}
    return build


def _gpt_neox(dropout, batch):
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, attn_implementation="sdpa",
        use_cache=False, hidden_dropout=dropout, attention_dropout=dropout)
    ids = _ids(shape=(batch, SEQ))
    return transformers.GPTNeoXForCausalLM(config), {"input_ids": ids, "labels": ids}


def _bert(dropout, batch):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, attn_implementation="sdpa",
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    ids = _ids(shape=(batch, SEQ))
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]  # masked-LM targets at some positions only
    return transformers.BertForMaskedLM(config), {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _t5(dropout, batch):
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
        num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, dropout_rate=dropout)
    return transformers.T5ForConditionalGeneration(config), {
        "input_ids": _ids(shape=(batch, SEQ)), "labels": _ids(shape=(batch, SEQ // 2))}


def _vit(dropout, batch):
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_labels=10, attn_implementation="sdpa",
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return transformers.ViTForImageClassification(config), {
        "pixel_values": torch.randn(batch, 3, 16, 16), "labels": _ids(10, (batch,))}


ZOO = {
    "llama": _decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                      num_key_value_heads=2, use_cache=False),
    "llama-cache": _decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                            num_key_value_heads=2),  # default use_cache=True: a DynamicCache
    "qwen2": _decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                      num_key_value_heads=2, use_cache=False),
    "gpt-neox": _gpt_neox,
    "mixtral": _decoder(transformers.MixtralConfig, transformers.MixtralForCausalLM,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        use_cache=False),
    "bert": _bert,
    "t5": _t5,
    "vit": _vit,
}


@dataclasses.dataclass
class Case:
    name: str
    model: torch.nn.Module
    kwargs: dict
    eager: tuple  # loss and gradients of one eager step
    top: int  # the unoptimised peak fxmem predicts (the BudgetError says it)
    floor: int  # the smallest feasible budget a 1-byte budget's BudgetError reports
    error: fxmem.BudgetError


def _build(name, dropout=0.1, batch=BATCH):
    """The model (train mode) and its step's keyword arguments; ``dropout`` where it has some."""
    torch.manual_seed(0)
    model, kwargs = ZOO[name](dropout, batch)
    return model.train(), kwargs


@pytest.fixture(scope="module", params=list(ZOO))
def case(request):
    name = request.param
    model, kwargs = _build(name)
    eager = grads_of(model, model, **kwargs)
    with pytest.raises(fxmem.BudgetError) as info:
        fxmem.optimize(model, 1, time_limit=TIME_LIMIT, **EAGER_RECOMPUTE)(**kwargs)
    return Case(name, model, kwargs, eager, info.value.unoptimized, info.value.floor, info.value)


def test_budget_of_one_byte_is_a_budget_error_with_its_floor(case):
    assert case.floor and case.error.holders, str(case.error)
    assert case.floor < case.top, (case.floor, case.top)


@pytest.mark.parametrize("where", [0.0, 1 / 3, 2 / 3], ids=["1.05x-floor", "third", "two-thirds"])
def test_budgets_hold_and_gradients_are_eager(case, where):
    """Budgets at 1.05x the floor and a third and two thirds of the way from it to the peak."""
    low = int(1.05 * case.floor)
    budget = int(low + where * (case.top - low))
    om = fxmem.optimize(case.model, budget, time_limit=TIME_LIMIT, **EAGER_RECOMPUTE)
    assert_same_grads(case.eager, grads_of(case.model, om, **case.kwargs))
    measured = measured_step_peak(case.model, om, (), case.kwargs)
    print(f"{case.name}: floor {case.floor} top {case.top} budget {budget} "
          f"predicted {om.plan.predicted_peak} measured {measured} "
          f"recomputed {om.plan.solution.num_recomputed}")
    assert measured <= budget, (budget, measured, om.plan.report())
    assert om.plan.predicted_peak == pytest.approx(measured, rel=0.01)
    if where == 0.0:
        assert om.plan.solution.num_recomputed > 0


@pytest.mark.parametrize("name", list(ZOO))
def test_batch_analysis_keeps_samples_apart(name):
    """The caches' empty concatenations, T5's shifted labels written into a zeros tensor, the
    experts' sort-gather-scatter: none of them mixes samples. With dropout too: every dropout is
    a draw the microbatches read from the whole batch's (batched along dim 0, one row a
    sample), none a coupling."""
    from fxmem.levers.microbatch.analysis import analyze_batch

    model, kwargs = _build(name, dropout=0.0)
    analysis = analyze_batch(fxmem.capture_step(model, (), kwargs))
    assert analysis.exact, analysis.reason
    assert analysis.reduction == "mean_over_targets" and analysis.draws == ()
    model, kwargs = _build(name, dropout=0.1)
    analysis = analyze_batch(fxmem.capture_step(model, (), kwargs))
    assert analysis.exact, analysis.reason
    has_dropout = name in ("gpt-neox", "bert", "t5", "vit")  # the decoders have none
    assert bool(analysis.draws) is has_dropout
    assert all(d is not None and (d.dim, d.rows) == (0, 1) for d in analysis.draws)


@pytest.mark.parametrize("name", ["llama-cache", "bert"])
def test_microbatches_give_the_whole_batch_gradients(name):
    """Split 2 + 1, dropout on (BERT's: the microbatches read the whole batch's masks); the
    mixture of experts' dispatch is checked the same way in
    tests/levers/microbatch/test_batch_rules.py."""
    model, kwargs = _build(name, dropout=0.1, batch=3)
    expected = grads_of(model, model, **kwargs)
    om = fxmem.optimize(model, "10GiB", allow=("recompute", "microbatch"), microbatches=2,
                        lowering="eager")
    assert_same_grads(expected, grads_of(model, om, **kwargs))
    assert om.plan.microbatch.sizes == (2, 1)


def test_mixture_of_experts_through_torch_compile_and_estimate():
    """fxmem's own fake-tensor runs take the path compiled code takes (transformers then avoids
    torch._grouped_mm for fp32, whose fake kernel takes bf16 only)."""
    model, kwargs = _build("mixtral")
    expected = grads_of(model, model, **kwargs)
    compiled = torch.compile(model, backend="fxmem",
                             options={"budget": "10GiB", "lowering": "eager"})
    assert_same_grads(expected, grads_of(model, compiled, **kwargs))
    assert fxmem.estimate(model, **kwargs).peak > 0
