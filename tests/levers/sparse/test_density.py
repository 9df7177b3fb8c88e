"""Which layers are sparsified, and their densities (ERK by default)."""

import math

import pytest
import torch
from torch import nn

from fxmem.levers.sparse import SparseLinear, eligible_layers, layer_densities, sparsify
from tests.helpers import make_tiny_gpt


def test_erk_spreads_the_overall_density_and_gives_small_layers_more():
    shapes = {"a": (512, 64), "b": (64, 64), "c": (4, 2, 1, 1), "d": (256, 256)}
    d = layer_densities(shapes, 0.1)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    nnz = sum(d[n] * numel[n] for n in shapes)
    assert nnz == pytest.approx(0.1 * sum(numel.values()))
    assert d["c"] == 1.0  # ERK would give it more than 1: dense, the rest solved again
    assert d["b"] > d["a"] > d["d"]  # by sum(shape) / prod(shape)
    assert d["b"] / d["d"] == pytest.approx((128 / 64**2) / (512 / 256**2))
    assert layer_densities(shapes, 0.1, "uniform") == {n: 0.1 for n in shapes}
    with pytest.raises(ValueError, match="distribution"):
        layer_densities(shapes, 0.1, "bogus")
    with pytest.raises(ValueError, match="no density given"):
        layer_densities(shapes, {"a": 0.5})


def test_first_and_last_layers_and_tied_weights_stay_dense():
    model, _, _ = make_tiny_gpt()
    names = list(eligible_layers(model))
    # the first weight layer is the token embedding and the last the head tied to it: every
    # block's linear layer is sparsified, the head (tied) is not
    assert "lm_head" not in names
    assert names == [f"blocks.{i}.{m}" for i in range(2)
                     for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    assert list(eligible_layers(mlp)) == ["1"]
    assert list(eligible_layers(mlp, keep_dense=None)) == ["0", "1", "2"]
    assert list(eligible_layers(mlp, keep_dense=None, exclude=["1"])) == ["0", "2"]
    with pytest.raises(ValueError, match="no module named"):
        eligible_layers(mlp, include=["nope"])


def test_sparsify_gives_each_layer_its_number_of_non_zeros():
    model, _, _ = make_tiny_gpt()
    shapes = {n: tuple(m.weight.shape) for n, m in eligible_layers(model).items()}
    expected = layer_densities(shapes, 0.2)
    sparsify(model, 0.2)
    layers = model.sparsity.layers
    assert set(layers) == set(shapes)
    for name, layer in layers.items():
        assert isinstance(layer, SparseLinear)
        assert layer.nnz == round(expected[name] * math.prod(shapes[name]))
        idx = layer.indices.long()
        assert bool((idx[1:] > idx[:-1]).all())  # sorted, unique
    report = model.sparsity.report()
    assert report.density == pytest.approx(0.2, abs=1e-3)
