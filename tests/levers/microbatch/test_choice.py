"""levers/microbatch/choice.py: k chosen with recomputation -- k = 1 when the whole batch fits,
a larger k when it does not, the fastest predicted k among those that fit, and what a split step
holds beyond its microbatch's graph."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxmem.graph.capture import capture_step
from fxmem.graph.torch_compat import pytree
from fxmem.levers.microbatch.analysis import analyze_batch
from fxmem.levers.microbatch.choice import choose_microbatches, extra_resident
from fxmem.levers.microbatch.runtime import accumulated_gradient_bytes
from fxmem.planning.options import PlanOptions, StepContext


class MLP(nn.Module):
    """Activations (batch x 64) dominate the parameters: microbatching pays."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x, y):
        return F.cross_entropy(self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x))))), y)


@pytest.fixture(scope="module")
def step():
    """The model, its flat inputs and the whole batch's captured step and batch analysis."""
    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(256, 16), torch.randint(0, 10, (256,))
    leaves, spec = pytree.tree_flatten(((x, y), {}))
    whole = capture_step(model, (x, y), {})
    return model, leaves, spec, [0, 1], whole, analyze_batch(whole)


def _choose(step, budget, allow=("recompute", "microbatch"), **kwargs):
    model, leaves, spec, slots, whole, analysis = step
    options = PlanOptions(budget=budget, allow=allow, safety_margin=0.0, time_limit=5)
    return choose_microbatches(model, leaves, spec, slots, analysis=analysis, options=options,
                               whole=whole, **kwargs)


@pytest.fixture(scope="module")
def whole_peak(step):
    """The whole batch's predicted peak, nothing recomputed (k = 1 under an ample budget)."""
    choice = _choose(step, 2**40)
    assert choice.k == 1 and len(choice.options) == 1  # k = 1 fits without recomputing: stop
    assert choice.options[0].feasible and choice.options[0].recompute_seconds == 0
    return choice.options[0].predicted_peak


def test_an_ample_budget_keeps_the_whole_batch(step, whole_peak):
    choice = _choose(step, whole_peak)  # exactly the whole batch's peak: it fits
    assert choice.k == 1 and choice.sizes == (256,)
    assert "chose k=1 ([256])" in choice.summary()


def test_a_budget_the_whole_batch_cannot_meet_is_met_by_more_microbatches(step, whole_peak):
    budget = int(0.6 * whole_peak)
    choice = _choose(step, budget, allow=("microbatch",))  # microbatching alone
    assert choice.k > 1 and sum(choice.sizes) == 256 and len(choice.sizes) == choice.k
    first = choice.options[0]
    assert first.k == 1 and not first.feasible and first.predicted_peak == whole_peak
    chosen = next(o for o in choice.options if o.k == choice.k)
    assert chosen.feasible and chosen.predicted_peak <= budget
    # without recomputation a smaller k is cheaper per step: the smallest k that fits
    assert choice.k == min(o.k for o in choice.options if o.feasible)
    assert "over budget" in choice.summary() and "fits" in choice.summary()


def test_with_recomputation_the_fastest_predicted_pair_that_fits_is_chosen(step, whole_peak):
    budget = int(0.6 * whole_peak)
    choice = _choose(step, budget)
    fits = [o for o in choice.options if o.feasible]
    assert fits and all(o.predicted_peak <= budget for o in fits)
    chosen = next(o for o in choice.options if o.k == choice.k)
    assert chosen.feasible and chosen.step_seconds == min(o.step_seconds for o in fits)
    # the search stops at the first k that fits recomputing nothing
    assert all(not o.feasible or o.recompute_seconds > 0 for o in choice.options[:-1])


def test_only_the_candidates_given_are_priced_and_k_1_stands_when_none_fits(step, whole_peak):
    choice = _choose(step, int(0.6 * whole_peak), allow=("microbatch",), candidates=[1])
    assert [o.k for o in choice.options] == [1] and choice.k == 1
    assert not choice.options[0].feasible  # the backend then names the floor


def test_what_the_context_holds_counts_against_the_budget(step, whole_peak):
    held = StepContext().plus({"optimizer state": whole_peak})  # as much again, held throughout
    choice = _choose(step, 2**40, context=held)
    assert choice.options[0].predicted_peak == 2 * whole_peak


def test_a_split_step_holds_the_gradient_buffers_and_the_rest_of_the_batch():
    model = MLP()
    params = list(model.parameters())
    x, y = torch.randn(256, 16), torch.randint(0, 10, (256,))
    assert extra_resident([x, y], 1000, [256], [0, 0], params) == {}  # k = 1: nothing more
    extra = extra_resident([x, y], 1000, [128, 128], [0, None], params)
    assert extra["gradients"] == accumulated_gradient_bytes(params) > 0
    # each microbatch's x is a view of the whole x, whose storage its graph counts whole already
    assert extra["inputs"] == 0
    assert extra["outputs"] == 1000
    # a batch dim the runtime copies each microbatch's slice of (x is contiguous, its slice along
    # dim 1 is not): the graph counts the copy, the rest of the whole x is held beside it
    xt = x.t().contiguous()
    assert extra_resident([xt, y], 0, [128, 128], [1, None], params)["inputs"] == \
        xt.untyped_storage().nbytes() // 2


def test_a_split_steps_inputs_are_counted_once_as_measured():
    """Microbatches read views of the whole batch's input: predicted equal to measured (before,
    the rest of the batch was counted again beside the graph's whole-storage input: 2229396
    bytes predicted against 1442788 measured for this step at k=4)."""
    import gc

    import fxmem

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 8), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(64, 4096), torch.randn(64, 1)
    om = fxmem.optimize(model, "1TiB", allow=("microbatch",), microbatches=4, lowering="eager",
                        loss_fn=lambda m, a, b: F.mse_loss(m(a), b))
    om(x, y).backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    measured = fxmem.measure_memory(lambda: om(x, y).backward(), device="cpu",
                                    baseline=[model, [x, y]]).peak
    assert len(om.plan.microbatch.sizes) == 4
    assert om.plan.predicted_peak == pytest.approx(measured, rel=0.01)
