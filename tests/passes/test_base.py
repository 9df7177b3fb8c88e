"""passes/base.py: a GraphPass checks the graphs it is given (requires) and returns (ensures), and
records its summary and the graphs' code before and after it (PassRecord)."""

import dataclasses

import pytest
import torch
import torch.fx

from fxmem.passes.base import GraphPass, PassInvariantError, PassRecord, StepGraphs

aten = torch.ops.aten


def _joint():
    """x -> relu -> neg, returned: a one-output graph."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(aten.relu.default, (x,))
    graph.output((graph.call_function(aten.neg.default, (y,)),))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _malformed():
    """neg reads relu's value before relu runs: Graph.lint refuses it."""
    gm = _joint()
    relu, neg = [n for n in gm.graph.nodes if n.op == "call_function"]
    relu.prepend(neg)
    return gm


@dataclasses.dataclass(frozen=True)
class Swapped:
    count: int

    def summary(self):
        return f"{self.count} relu swapped"


class ReluToSigmoid(GraphPass):
    """Replaces every relu by a sigmoid (the decision: the target to put in)."""

    name = "relu-to-sigmoid"

    def run(self, graphs, decision):
        gm = torch.fx.GraphModule(torch.nn.Module(), graphs.joint.graph.__deepcopy__())
        count = 0
        for node in gm.graph.nodes:
            if node.target is aten.relu.default:
                node.target, count = decision, count + 1
        gm.recompile()
        return dataclasses.replace(graphs, joint=gm), Swapped(count)


def test_a_pass_records_its_summary_and_the_code_before_and_after():
    graphs = StepGraphs(num_fwd_outputs=1, joint=_joint())
    out, record = ReluToSigmoid()(graphs, aten.sigmoid.default)
    assert isinstance(record, PassRecord)
    assert record.name == "relu-to-sigmoid" and record.summary == "1 relu swapped"
    assert record.details == Swapped(1)
    assert set(record.before) == set(record.after) == {"joint"}
    assert "aten.relu" in record.before["joint"] and "sigmoid" not in record.before["joint"]
    assert "aten.sigmoid" in record.after["joint"] and "aten.relu" not in record.after["joint"]
    assert record.after == out.code()
    assert graphs.joint.code == record.before["joint"]  # the input graphs are left as they were


def test_details_without_a_summary_method_are_summarised_as_text():
    class Plain(GraphPass):
        def run(self, graphs, decision):
            return graphs, {"changed": 0}

    _, record = Plain()(StepGraphs(num_fwd_outputs=1, joint=_joint()), None)
    assert record.summary == "{'changed': 0}" and record.before == record.after


def test_a_malformed_graph_given_to_a_pass_is_refused_before_it_runs():
    ran = []

    class Spy(ReluToSigmoid):
        def run(self, graphs, decision):
            ran.append(True)
            return super().run(graphs, decision)

    with pytest.raises(PassInvariantError,
                       match="pass relu-to-sigmoid: the joint graph given to it is malformed"):
        Spy()(StepGraphs(num_fwd_outputs=1, joint=_malformed()), aten.sigmoid.default)
    assert not ran


def test_a_pass_that_returns_a_malformed_graph_is_caught():
    class Breaks(GraphPass):
        name = "breaks"

        def run(self, graphs, decision):
            return dataclasses.replace(graphs, forward=_malformed()), None

    with pytest.raises(PassInvariantError, match="pass breaks: the forward graph it returned"):
        Breaks()(StepGraphs(num_fwd_outputs=1, joint=_joint()), None)


def test_a_pass_that_changes_the_number_of_forward_outputs_is_caught():
    class Drops(GraphPass):
        name = "drops"

        def run(self, graphs, decision):
            return dataclasses.replace(graphs, num_fwd_outputs=0), None

    with pytest.raises(PassInvariantError, match="pass drops changed the number of forward"):
        Drops()(StepGraphs(num_fwd_outputs=1, joint=_joint()), None)


def test_step_graphs_present_only_the_graphs_they_have_in_order():
    joint, forward = _joint(), _joint()
    graphs = StepGraphs(num_fwd_outputs=1, joint=joint, forward=forward)
    assert list(graphs.present()) == ["joint", "forward"]
    assert graphs.present()["forward"] is forward
    assert graphs.code() == {"joint": joint.code, "forward": forward.code}
    assert StepGraphs(num_fwd_outputs=1).present() == {}
