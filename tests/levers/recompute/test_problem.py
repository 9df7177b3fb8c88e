"""The recompute problem of a step lowered through Inductor: values it inlines."""

import numpy as np
import torch

from fxmem.graph.capture import capture_step
from fxmem.cost.model import graph_costs, spec_for
from fxmem.levers.recompute.problem import build_problem
from fxmem.solver import save_all


class Residual(torch.nn.Module):
    """Two residual blocks: each sum of a convolution and the stream is read by a batch norm,
    inlined into its kernels by Inductor, and by the backward."""

    def __init__(self, c=8):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c, c, 3, padding=1) for _ in range(3))
        self.bns = torch.nn.ModuleList(torch.nn.BatchNorm2d(c) for _ in range(3))

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = x + conv(torch.relu(bn(x)))
        return x.square().mean()


def test_inlined_sums_the_backward_reads_are_optional_candidates():
    torch.manual_seed(0)
    step = capture_step(Residual(), (torch.randn(4, 8, 16, 16),))
    costs = graph_costs(step.gm, spec_for(step.device))
    problem = build_problem(step, costs, replay_random=True, lowering="inductor").problem
    fused = problem.again_size == 0
    sums = [i for i in np.flatnonzero(fused) if problem.names[i].startswith("add")]
    assert sums, problem.names
    assert problem.direct[sums].all() and not problem.never_save[sums].any()
    # saving them is the unoptimised step (eager autograd saves the sums)
    everything = save_all(problem).decision
    assert everything.saved[sums].all() and not everything.recomputed.any()
    # not saving a sum makes its kernels' readers in the backward read what it sums: the
    # convolution's output is then needed, and lives until the sum's last reader
    last = sums[-1]
    saved = everything.saved.copy()
    saved[last] = False
    decision = problem.normalise(saved)
    assert decision.recomputed[last]
    inputs = list(problem.inputs[last])
    assert inputs and problem.needed(decision.saved)[inputs].all()
    assert not problem.needed(everything.saved)[inputs].all()  # saved sums do not need them
    assert (problem.need_end[inputs] >= problem.need_end[last]).all()
    assert problem.cost[last] > 0


class SeededDropout(torch.nn.Module):
    """Dropout as Inductor rewrites it with ``fallback_random=False``: seeds drawn once per step
    (``inductor_seeds``, no tensor input), then a deterministic function of a seed."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        seeds = torch.ops.prims.inductor_seeds.default(1, x.device)
        seed = torch.ops.prims.inductor_lookup_seed.default(seeds, 0)
        keep = torch.ops.prims.inductor_random.default([8, 16], seed, "rand") > 0.5
        return (self.lin(x).relu() * keep).sum()


def test_random_op_without_tensor_inputs_is_saved_and_its_seeded_uses_recomputable():
    torch.manual_seed(0)
    step = capture_step(SeededDropout(), (torch.randn(8, 16),))
    costs = graph_costs(step.gm, spec_for(step.device))
    problem = build_problem(step, costs, replay_random=True, lowering="inductor").problem
    index = {name: i for i, name in enumerate(problem.names)}
    # replaying it would need a device's generator state, taken from a tensor input it lacks
    assert problem.must_save[index["inductor_seeds"]]
    # what Inductor computes from the saved seeds is a pure function: the solver may recompute it
    assert not problem.must_save[index["inductor_random"]]
    assert not problem.must_save[index["gt"]]
