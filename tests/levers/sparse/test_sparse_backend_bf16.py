"""A model the user sparsified, compiled with the fxmem backend and bf16 compute: the sparse
layers' backwards run in the gradient's dtype.

TorchDynamo traces the backend's graphs in fp32 and fxmem then runs them under autocast, so a
dtype the backward read in Python (``x.to(grad.dtype)``) was baked in as fp32: the values'
gradient multiplied a bf16 gradient by an fp32 input ("expected m1 and m2 to have the same
dtype"). Found on a model with graph breaks at 60% of its eager peak."""

import torch
import torch._dynamo

import fxmem


class ConvMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.up = torch.nn.Linear(16 * 8 * 8, 256)
        self.down = torch.nn.Linear(256, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        torch._dynamo.graph_break()
        return self.down(torch.relu(self.up(h))).square().mean()


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_a_sparsified_model_trains_in_bf16_through_the_backend():
    torch.manual_seed(0)
    model = fxmem.sparsify(ConvMLP(), 0.5)
    x = torch.randn(32, 3, 8, 8)
    with torch.autocast("cpu", torch.bfloat16):
        model(x).backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxmem", options={
        "budget": "1GiB", "allow": ("recompute", "precision"), "precision": "bf16",
        "lowering": "eager", "time_limit": 2})
    compiled(x).backward()
    got = _grads(model)
    torch._dynamo.reset()
    assert [g.dtype for g in got] == [torch.float32] * len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-3)
