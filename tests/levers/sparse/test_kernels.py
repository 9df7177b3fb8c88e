"""The kernel per layer is chosen by measurement: the faster of transient dense and CSR."""

import pytest
import torch
from torch import nn

import fxmem
from fxmem.levers.sparse import SparseConv2d, choose_kernel, sparsify
from fxmem.levers.sparse import kernels
from fxmem.levers.sparse.sparsify import initial_indices
from fxmem.levers.sparse.layers import SparseLinear


@pytest.fixture(autouse=True)
def _fresh_choices():
    """Each test times its layers: the choices other tests made in this process are forgotten
    (and theirs are put back after, so the tests do not depend on their order)."""
    kept = dict(kernels._CHOICES)
    kernels.clear_kernel_choices()
    yield
    kernels.clear_kernel_choices()
    kernels._CHOICES.update(kept)


@pytest.mark.parametrize("faster", ["dense", "csr"])
def test_choose_kernel_keeps_the_measured_faster(monkeypatch, faster):
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    layer = SparseLinear.from_dense(dense, initial_indices(dense.weight, 20))
    measured = {"dense": 2e-3, "csr": 1e-3} if faster == "csr" else {"dense": 1e-3, "csr": 2e-3}
    seen = []

    def fake(layer_, kernels_, shape, **kw):
        seen.append((kernels_, shape))
        return {k: measured[k] for k in kernels_}

    monkeypatch.setattr(kernels, "time_kernels", fake)
    assert choose_kernel(layer, (4, 16)) == faster
    assert layer.kernel == faster and layer.kernel_times == measured
    assert seen == [(("dense", "csr"), (4, 16))]
    assert (layer.crow is not None) == (faster == "csr")


def test_time_kernel_runs_both_kernels_and_restores_the_layer():
    torch.manual_seed(0)
    dense = nn.Linear(32, 16)
    layer = SparseLinear.from_dense(dense, initial_indices(dense.weight, 50))
    layer.set_kernel("csr")
    times = kernels.time_kernels(layer, ("dense", "csr"), (8, 32), repeats=1, min_block_s=0.0)
    assert set(times) == {"dense", "csr"} and min(times.values()) > 0
    assert kernels.time_kernel(layer, "dense", (8, 32), repeats=1) > 0
    assert layer.kernel == "csr" and layer.values.grad is None


def test_sparsify_auto_measures_each_layer_on_the_input_it_sees(tiny_gpt):
    model, args, _ = tiny_gpt(n_layer=1)
    rng = torch.random.get_rng_state()
    sparsify(model, 0.1, kernel="auto", example_inputs=args)
    assert torch.equal(torch.random.get_rng_state(), rng)
    for name, layer in model.sparsity.layers.items():
        assert set(layer.kernel_times) == {"dense", "csr"}
        assert layer.kernel == kernels.preferred_kernel(layer.kernel_times), name
    rows = {r.name: r for r in model.sparsity.report().layers}
    assert all(r.kernel_times for r in rows.values())
    with pytest.raises(ValueError, match="example_inputs"):
        sparsify(tiny_gpt()[0], 0.1, kernel="auto")


def test_convolutions_have_the_transient_dense_kernel_only():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3)
    layer = SparseConv2d.from_dense(conv, initial_indices(conv.weight, 30))
    assert choose_kernel(layer, (2, 4, 6, 6)) == "dense"
    assert set(layer.kernel_times) == {"dense"}
    with pytest.raises(ValueError, match="linear layers"):
        layer.set_kernel("csr")


def test_sparsify_is_fxmems():
    assert fxmem.sparsify is sparsify
    assert callable(fxmem.to_dense)


def test_csr_kernel_runs_under_bf16_autocast():
    """The precision lever's bf16 casts feed a CSR layer bf16 activations (the output of a bf16
    matrix product before it); MKL's CSR product has no bf16 kernel (NotImplementedError:
    "addmm_out_sparse_csr_impl_mkl" not implemented for 'BFloat16', met by the bench GPT planned
    with every lever): the product runs in the values' dtype and returns the input's."""
    torch.manual_seed(0)
    dense = nn.Linear(32, 16)
    layer = SparseLinear.from_dense(dense, initial_indices(dense.weight, 50))
    layer.set_kernel("csr")
    first = nn.Linear(8, 32)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", torch.bfloat16):
        h = first(x)
        assert h.dtype == torch.bfloat16
        out = layer(h)
    out.float().square().sum().backward()
    assert layer.values.grad is not None and layer.values.grad.dtype == torch.float32
    assert first.weight.grad is not None
    expected = layer.to_dense_module()(h.float())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_dense_kernel_backward_under_bf16_autocast():
    """Under bf16 casts the transient dense kernel's product runs in bf16 and its gradient comes
    back bf16, while the saved input may be fp32: the backward multiplied them as they were
    (RuntimeError: expected m1 and m2 to have the same dtype, met by the bench GPT planned with
    every lever through Inductor); the gradients now come back in each input's dtype."""
    torch.manual_seed(0)
    dense = nn.Linear(32, 16)
    layer = SparseLinear.from_dense(dense, initial_indices(dense.weight, 50))
    layer.set_kernel("dense")
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    assert layer.values.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert layer.bias.grad.dtype == torch.float32


def test_csr_is_taken_only_when_faster_by_the_margin():
    assert kernels.preferred_kernel({"dense": 1.0, "csr": 0.85}) == "csr"
    assert kernels.preferred_kernel({"dense": 1.0, "csr": 0.95}) == "dense"  # within 10%
    assert kernels.preferred_kernel({"dense": 1.0, "csr": 1.0}) == "dense"  # a tie: the default
    assert kernels.preferred_kernel({"dense": 1.0, "csr": 0.95}, margin=0.0) == "csr"
    assert kernels.preferred_kernel({"dense": 1.0}) == "dense"


def test_one_choice_per_layer_configuration_per_process(monkeypatch):
    """A configuration is timed once: a second layer like it (another model, a later
    sparsification) gets the first one's kernel even if timing again would flip it."""
    torch.manual_seed(0)
    answers = iter([{"dense": 2e-3, "csr": 1e-3}, {"dense": 1e-3, "csr": 2e-3}])
    timed = []

    def fake(layer_, kernels_, shape, **kw):
        timed.append(shape)
        return next(answers)

    monkeypatch.setattr(kernels, "time_kernels", fake)
    layers = [SparseLinear.from_dense(d, initial_indices(d.weight, 20))
              for d in (nn.Linear(16, 8), nn.Linear(16, 8))]
    assert [choose_kernel(layer, (4, 16)) for layer in layers] == ["csr", "csr"]
    assert timed == [(4, 16)] and layers[1].kernel_times == {"dense": 2e-3, "csr": 1e-3}
    assert choose_kernel(layers[0], (2, 16)) == "dense"  # another input shape: timed
    assert timed == [(4, 16), (2, 16)] and len(kernels.kernel_choices()) == 2
    kernels.clear_kernel_choices()
    assert kernels.kernel_choices() == {}
