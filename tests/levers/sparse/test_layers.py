"""Sparse layers: forward and gradients equal the masked dense layer's; state_dict round trips;
export to a dense model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxmem.levers.sparse import SparseConv2d, SparseLinear, sparsify, to_dense
from fxmem.levers.sparse.sparsify import initial_indices


def _masked_reference(layer, weight, bias, x, fn):
    """Output and gradients (input, masked weight at the non-zeros, bias) of the dense layer
    whose weight is ``weight`` masked to the sparse layer's pattern."""
    w = (weight.detach() * layer.mask()).requires_grad_()
    b = bias.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    out = fn(xr, w, b)
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, [xr, w, b], g)
    return out, g, gx, gw.reshape(-1)[layer.indices.long()], gb


@pytest.mark.parametrize("kernel", ["dense", "csr"])
def test_sparse_linear_forward_and_gradients_equal_the_masked_dense_layers(kernel):
    torch.manual_seed(0)
    dense = nn.Linear(48, 40)
    idx = initial_indices(dense.weight, 200, "random", torch.Generator().manual_seed(1))
    layer = SparseLinear.from_dense(dense, idx)
    layer.set_kernel(kernel)
    x = torch.randn(3, 5, 48, requires_grad=True)
    out_ref, g, gx_ref, gv_ref, gb_ref = _masked_reference(
        layer, dense.weight, dense.bias, x, lambda x, w, b: F.linear(x, w, b))
    out = layer(x)
    gx, gv, gb = torch.autograd.grad(out, [x, layer.values, layer.bias], g)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gv, gv_ref)
    torch.testing.assert_close(gb, gb_ref)
    assert layer.values.shape == (200,) and layer.indices.dtype == torch.int32


def test_sparse_conv2d_forward_and_gradients_equal_the_masked_dense_layers():
    torch.manual_seed(0)
    dense = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    idx = initial_indices(dense.weight, 90, "magnitude")
    layer = SparseConv2d.from_dense(dense, idx)
    x = torch.randn(2, 6, 9, 9, requires_grad=True)
    out_ref, g, gx_ref, gv_ref, gb_ref = _masked_reference(
        layer, dense.weight, dense.bias, x, lambda x, w, b: F.conv2d(x, w, b, 2, 1))
    out = layer(x)
    gx, gv, gb = torch.autograd.grad(out, [x, layer.values, layer.bias], g)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gv, gv_ref)
    torch.testing.assert_close(gb, gb_ref)
    # magnitude init keeps the largest weights
    magnitudes = dense.weight.detach().abs().reshape(-1)
    assert magnitudes[idx].min() >= magnitudes.kthvalue(magnitudes.numel() - 90).values


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_state_dict_round_trips_into_a_fresh_sparsified_model():
    model = sparsify(_mlp(), 0.2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.sparsity.attach(opt, every=1, method="set")
    x = torch.randn(8, 16)
    for _ in range(3):  # train and rewire, so the masks are not the initial ones
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        model.sparsity.step()
    saved = copy.deepcopy(model.state_dict())
    fresh = sparsify(_mlp(), 0.2, init="random", seed=5)  # other masks, same numbers of non-zeros
    assert not torch.equal(fresh[2].indices, model[2].indices)
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh(x), model(x))
    assert set(saved) == set(model.state_dict())
    assert all(k.endswith(("values", "indices", "bias", "weight")) for k in saved)


def test_state_dict_with_other_numbers_of_non_zeros_loads_by_resizing():
    model = sparsify(_mlp(), 0.3)
    other = sparsify(_mlp(), 0.1)
    other.load_state_dict(model.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(other(x), model(x))
    assert other[2].nnz == model[2].nnz


@pytest.mark.parametrize("kernel", ["dense", "csr"])
def test_csr_buffers_follow_a_loaded_state_dict(kernel):
    model = sparsify(_mlp(), 0.2, kernel=kernel)
    other = sparsify(_mlp(), 0.2, init="random", kernel=kernel)
    other.load_state_dict(model.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(other(x), model(x))
    assert not any(k.endswith(("crow", "col")) for k in model.state_dict())  # derived


def test_to_dense_exports_the_same_function_as_plain_layers():
    model = sparsify(_mlp(), 0.2)
    dense = to_dense(model)
    x = torch.randn(4, 16)
    torch.testing.assert_close(dense(x), model(x))
    assert [type(m) for m in dense] == [type(m) for m in _mlp()]
    assert not hasattr(dense, "sparsity") and hasattr(model, "sparsity")  # a copy by default
    assert float((dense[2].weight != 0).float().mean()) == pytest.approx(model[2].density)


def test_to_dense_of_a_conv_model_inplace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1))
    sparsify(model, 0.25)
    assert isinstance(model[1], SparseConv2d)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert to_dense(model, inplace=True) is model
    assert type(model[1]) is nn.Conv2d
    torch.testing.assert_close(model(x), expected)
