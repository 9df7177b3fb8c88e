"""memory/storages.py: the one storage table (build_table) of a joint graph and of a plan's
forward and backward graphs (plan_table), on a small real step captured by AOTAutograd."""

import collections

import pytest
import torch
import torch.nn.functional as F

from fxmem.graph.joint import forward_node_names, step_from_joint
from fxmem.memory.simulation import simulate
from fxmem.memory.storages import (build_table, check_lowering, joint_table, plan_storages,
                                   plan_table)
from fxmem.passes.recompute import split_with_saved
from tests.helpers import aot_joint

aten = torch.ops.aten


class Residual(torch.nn.Module):
    """h feeds both a linear layer and the residual sum: its gradient is a backward sum."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = (torch.nn.Linear(32, 32), torch.nn.Linear(32, 32),
                                  torch.nn.Linear(32, 4))

    def forward(self, x, y):
        h = self.a(x).relu()
        return F.cross_entropy(self.b(h + self.c(h)), y)


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    model = Residual()
    joint, num_fwd_outputs, static = aot_joint(model, torch.randn(16, 32),
                                               torch.randint(0, 4, (16,)))
    step = step_from_joint(joint, num_fwd_outputs=num_fwd_outputs, static_input_indices=static)
    return model, step, num_fwd_outputs


def _nbytes(t):
    return t.numel() * t.element_size()


def test_joint_table_gives_each_storage_its_category(captured):
    model, step, _ = captured
    s = joint_table(step, lowering="eager").storages
    of = s.node_storages
    nodes = {n.name: n for n in step.gm.graph.nodes}

    def category(name):
        (sid,) = of[name]
        return s.category[sid]

    params = sum(_nbytes(p) for p in model.parameters())
    total = collections.Counter()
    for sid, cat in enumerate(s.category):
        total[cat] += s.nbytes[sid]
    assert total["parameters"] == params
    assert total["gradients"] == params  # one gradient per parameter, nothing else
    assert total["inputs"] == 16 * 32 * 4 + 16 * 8  # x (float32) and y (int64)
    assert all(category(p) == "parameters" for p in step.param_names)
    assert all(category(g) == "gradients" for g in step.grad_of)
    assert category(step.loss_node) == "outputs"  # held by the caller to the end
    relu = next(n for n in nodes.values() if n.target is aten.relu.default)
    assert category(relu.name) == "saved activations"  # the backward reads it
    for i in range(s.backward_start, len(s.op_names)):  # a backward op makes temporaries and
        for sid in s.creates[i]:  # gradients (its views share what they view)
            assert s.category[sid] in ("temporaries", "gradients"), s.op_names[i]
    # resident: parameters, inputs and the tangent; pinned: the loss and the gradients
    assert {s.category[i] for i in s.resident} == {"parameters", "inputs", "temporaries"}
    assert {sid for g in [step.loss_node, *step.grad_of] for sid in of[g]} <= s.pinned
    first_backward = min(i for i, name in enumerate(s.op_names) if name in step.backward_nodes)
    assert s.backward_start == first_backward


def test_only_the_autograd_lowering_lets_a_backward_sum_take_over_a_dying_addend(captured):
    _, step, _ = captured
    autograd = joint_table(step, lowering="autograd").storages
    eager = joint_table(step, lowering="eager").storages
    assert eager.accumulates == {}
    assert autograd.accumulates, "h's gradient is a sum of two: autograd accumulates in place"
    op_of = {sid: i for i, made in enumerate(autograd.creates) for sid in made}
    for made, addends in autograd.accumulates.items():
        assert autograd.op_names[op_of[made]].startswith("add")
        assert op_of[made] >= autograd.backward_start
        assert not set(addends) & autograd.resident
    assert simulate(autograd).peak <= simulate(eager).peak


def test_a_plan_that_saves_everything_simulates_like_the_joint_run_as_fx_code(captured):
    _, step, num_fwd_outputs = captured
    forward = forward_node_names(step.gm, num_fwd_outputs)
    saved = [n.name for n in step.gm.graph.nodes if n.op == "call_function" and n.name in forward]
    fw, bw, record = split_with_saved(step.gm, saved, num_fwd_outputs=num_fwd_outputs)
    assert record.recomputed == ()
    plan = plan_table(step, fw, bw, num_fwd_outputs=num_fwd_outputs)
    joint = joint_table(step, lowering="eager")
    assert len(plan.graphs) == 2 and set(plan.op_graph) == {0, 1}
    # the same storages (a saved value is one storage across the two graphs), the same
    # categories and the same peak
    assert collections.Counter(zip(plan.storages.category, plan.storages.nbytes)) == \
        collections.Counter(zip(joint.storages.category, joint.storages.nbytes))
    assert simulate(plan.storages).peak == simulate(joint.storages).peak
    assert plan.storages == plan_storages(step, fw, bw, num_fwd_outputs=num_fwd_outputs)


def test_kept_values_live_to_the_end(captured):
    _, step, _ = captured
    relu = next(n.name for n in step.gm.graph.nodes if n.target is aten.relu.default)
    table = build_table([step.gm], roles=step.roles,
                        is_backward=lambda _, node: step.is_backward(node),
                        held=[(0, step.loss_node)], gradients=[(0, g) for g in step.grad_of],
                        device=step.device, keep=[(0, relu)])
    (sid,) = table.graph_storages[0][relu]
    assert sid in table.storages.pinned
    assert sid not in joint_table(step, lowering="eager").storages.pinned


def test_unknown_lowerings_are_refused():
    assert check_lowering("inductor") == "inductor"
    with pytest.raises(ValueError, match="lowering must be one of"):
        check_lowering("tpu")


def test_a_plans_graphs_do_not_run_under_autograd(captured):
    _, step, num_fwd_outputs = captured
    with pytest.raises(ValueError, match="not autograd"):
        plan_storages(step, step.gm, step.gm, num_fwd_outputs=num_fwd_outputs,
                      lowering="autograd")
