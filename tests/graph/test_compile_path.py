"""fxmem's own runs of the model (fake-tensor layout, make_fx capture) see the code path the
compiled step runs: libraries that branch on ``torch.compiler.is_compiling()`` (Hugging Face's
mixture-of-experts layers) take their compiled branch there too."""

import torch

import fxmem
from tests.helpers import EAGER_RECOMPUTE
from fxmem.graph.compile_path import compiled_code_path


def test_compiling_inside_and_restored_after():
    assert not torch.compiler.is_compiling()
    with compiled_code_path():
        assert torch.compiler.is_compiling()
        assert torch._dynamo.is_compiling()
        with compiled_code_path():
            assert torch.compiler.is_compiling()
        assert torch.compiler.is_compiling()
    assert not torch.compiler.is_compiling()
    try:
        with compiled_code_path():
            raise KeyError
    except KeyError:
        pass
    assert not torch.compiler.is_compiling()


class Branchy(torch.nn.Module):
    """Eager takes a path fake tensors cannot run (``.item()``); compiled code another."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        if torch.compiler.is_compiling():
            return (h * 2).square().mean()
        return (h * h.abs().max().item()).square().mean()  # not traceable on fake tensors


def test_capture_and_optimize_take_the_compiled_branch():
    torch.manual_seed(0)
    model, x = Branchy(), torch.randn(4, 8)
    step = fxmem.capture_step(model, (x,))
    assert not any("_local_scalar_dense" in str(n.target) for n in step.gm.graph.nodes)
    om = fxmem.optimize(model, "1GiB", **EAGER_RECOMPUTE)
    loss = om(x)
    torch.testing.assert_close(loss, (model.lin(x) * 2).square().mean())
    assert fxmem.estimate(model, x).peak > 0
