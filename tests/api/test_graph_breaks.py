"""Graph breaks through the torch.compile backend: the graphs of one step share one budget, and a
graph fxmem cannot see the rest of the step around says so instead of overshooting silently."""

import warnings

import pytest
import torch
import torch._dynamo

import fxmem
from fxmem.api.backend import LAST_PLANS
from fxmem.api.graph_breaks import BudgetNotGuaranteedWarning
from tests.helpers import assert_same_grads, grads_of


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class BreakInLoop(torch.nn.Module):
    """Eight MLP blocks with two graph breaks in the block loop: TorchDynamo skips the loop's
    frame and compiles each block's forward on its own."""

    def __init__(self, width=256, blocks=8):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in (2, 5):
                torch._dynamo.graph_break()
        return self.head(x).square().mean()


class BreakBetweenStages(BreakInLoop):
    """The same blocks with the two breaks between stages: three graphs of one step."""

    def stage(self, x, start, stop):
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def forward(self, x):
        x = self.stage(x, 0, 3)
        torch._dynamo.graph_break()
        x = self.stage(x, 3, 6)
        torch._dynamo.graph_break()
        return self.head(self.stage(x, 6, 8)).square().mean()


def _step_peak(model, call, x):
    def step():
        call(x).backward()

    model.zero_grad(set_to_none=True)
    step()  # compiles (plans) on the first call
    model.zero_grad(set_to_none=True)
    # the step's own bytes: the model and its input at the start, then all it allocates
    peak = fxmem.measure_memory(step, device="cpu", baseline=[model, x]).peak
    model.zero_grad(set_to_none=True)
    return peak


@pytest.fixture(scope="module")
def staged():
    torch.manual_seed(0)
    model = BreakBetweenStages()
    x = torch.randn(2048, 256)
    return model, x, _step_peak(model, model, x), grads_of(model, model, x)


@pytest.mark.parametrize("fraction", [1.0, 0.9, 0.8, 0.75])
def test_graphs_split_by_breaks_share_the_budget(staged, fraction):
    """Every graph is planned with what the others hold (their parameters, the activations the
    graphs before it saved, the gradients the graphs after it make before its backward, and a
    share kept for the activations the later graphs will save): the whole step's measured peak
    stays under the budget, and the gradients equal eager's."""
    model, x, eager_peak, expected = staged
    budget = int(fraction * eager_peak)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxmem",
                             options={"budget": budget, "lowering": "eager", "time_limit": 5})
    peak = _step_peak(model, compiled, x)
    plans = list(LAST_PLANS.plans)[-3:]
    assert peak <= budget, (peak, budget, [p.report() for p in plans])
    assert all(any("split by graph breaks" in n for n in p.notes) for p in plans)
    assert "saved by the 2 graph(s) before it" in plans[-1].notes[0]
    assert_same_grads(expected, grads_of(model, compiled, x))
    torch._dynamo.reset()


def test_a_graph_compiled_inside_eager_code_warns_that_the_budget_is_not_guaranteed():
    """A graph break in a loop makes TorchDynamo compile each block on its own while the loop
    runs eagerly: fxmem cannot see the step, so it warns (and the plan says so) rather than
    overshooting silently; gradients still equal eager's."""
    torch.manual_seed(0)
    model = BreakInLoop(width=32)
    x = torch.randn(16, 32)
    expected = grads_of(model, model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxmem",
                             options={"budget": "1GiB", "lowering": "eager"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = grads_of(model, compiled, x)
    messages = [str(w.message) for w in caught if issubclass(w.category, BudgetNotGuaranteedWarning)]
    assert messages and "graph break inside a loop" in messages[0]
    assert "forward" in messages[0] and "test_graph_breaks.py" in messages[0]
    assert any("may exceed the budget" in n for n in LAST_PLANS.latest.notes)
    assert_same_grads(expected, got)
    torch._dynamo.reset()
