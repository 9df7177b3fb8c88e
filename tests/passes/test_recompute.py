"""passes/recompute.py: RecomputeSplit splits a joint graph into a forward that saves exactly the
values decided and a backward that recomputes the rest, records what it recomputed, and keeps the
step's gradients."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fxmem.graph.joint import forward_node_names, step_from_joint
from fxmem.passes.base import PassInvariantError, StepGraphs
from fxmem.passes.recompute import RECOMPUTED, RecomputeSplit, SaveDecision

aten = torch.ops.aten


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 4)

    def forward(self, x, y):
        return F.cross_entropy(self.b(torch.tanh(self.a(x)).relu()), y)


@pytest.fixture(scope="module")
def joint():
    from tests.helpers import aot_joint

    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    gm, n_out, static = aot_joint(model, x, y)
    primals = [*model.parameters()][:2] + [x] + [*model.parameters()][2:] + [y]  # graph order
    return gm, n_out, static, primals


def _run_joint(gm, primals):
    outputs, grads = gm(list(primals), [torch.ones(())])
    return outputs[0], [g for g in grads if g is not None]


def _run_split(graphs, primals):
    n = graphs.num_fwd_outputs
    fw_out = graphs.forward(*primals)
    loss, saved = fw_out[0], fw_out[n:]
    grads = graphs.backward(*saved, torch.ones(()))
    return loss, [g for g in grads if g is not None]


def test_saving_only_the_first_layer_recomputes_the_rest_and_records_it(joint):
    gm, n_out, _, primals = joint
    addmm = next(n.name for n in gm.graph.nodes if n.target is aten.addmm.default)
    graphs, record = RecomputeSplit()(StepGraphs(n_out, joint=gm), SaveDecision(saved=(addmm,)))
    details = record.details
    assert record.name == "recompute-split" and set(record.after) == {"joint", "forward",
                                                                        "backward"}
    assert addmm in details.saved
    # tanh and relu are recomputed in the backward from the saved addmm
    recomputed = set(details.recomputed)
    assert {"tanh", "relu"} <= recomputed and addmm not in recomputed
    placeholders = {n.name for n in graphs.backward.graph.nodes if n.op == "placeholder"}
    assert "tanh" not in placeholders and "relu" not in placeholders
    tagged = {n.name for n in graphs.backward.graph.nodes if n.meta.get(RECOMPUTED)}
    assert recomputed <= tagged
    assert f"{len(details.recomputed)} forward ops recomputed in backward" in record.summary
    # the split step computes the joint's loss and gradients
    loss, grads = _run_split(graphs, primals)
    loss0, grads0 = _run_joint(gm, primals)
    torch.testing.assert_close(loss, loss0)
    assert len(grads) == len(grads0) == 4
    for a, b in zip(grads, grads0):
        torch.testing.assert_close(a, b)


def test_saving_every_forward_value_recomputes_nothing(joint):
    gm, n_out, *_ = joint
    forward = forward_node_names(gm, n_out)
    saved = tuple(n.name for n in gm.graph.nodes if n.op == "call_function" and n.name in forward)
    _, record = RecomputeSplit()(StepGraphs(n_out, joint=gm), SaveDecision(saved=saved))
    assert record.details.recomputed == () and record.details.moved == 0


def test_saving_a_backward_value_is_refused(joint):
    gm, n_out, static, _ = joint
    step = step_from_joint(gm, num_fwd_outputs=n_out, static_input_indices=static)
    backward = sorted(step.backward_nodes)[0]
    with pytest.raises(ValueError, match="not forward nodes"):
        RecomputeSplit()(StepGraphs(n_out, joint=gm), SaveDecision(saved=(backward,)))


def test_the_split_needs_the_joint_graph():
    with pytest.raises(ValueError, match="needs the joint graph"):
        RecomputeSplit().run(StepGraphs(1), SaveDecision(saved=()))


def test_ensures_refuses_a_forward_returning_fewer_values_than_the_steps_outputs(joint):
    gm, n_out, *_ = joint
    before = StepGraphs(n_out, joint=gm)
    graphs, _ = RecomputeSplit()(before, SaveDecision(saved=()))
    fw = torch.fx.GraphModule(graphs.forward, graphs.forward.graph.__deepcopy__())
    output = fw.graph.output_node()
    output.args = ((),)  # returns nothing: not even the loss
    fw.recompile()
    broken = dataclasses.replace(graphs, forward=fw)
    with pytest.raises(PassInvariantError, match="the forward returns 0 values, fewer than"):
        RecomputeSplit().ensures(before, broken)
    RecomputeSplit().ensures(before, graphs)  # the real split passes
