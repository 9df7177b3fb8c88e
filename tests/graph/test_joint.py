"""graph/joint.py: an AOTAutograd joint graph (what a partitioner receives) labelled as a
CapturedStep -- which primals are parameters, buffers and inputs, which nodes are forward, which
gradient belongs to which primal."""

import copy
import operator

import pytest
import torch
import torch.nn.functional as F

from fxmem.graph.capture import Role
from fxmem.graph.joint import forward_node_names, step_from_joint
from tests.helpers import aot_joint


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 4)

    def forward(self, x, y):
        return F.cross_entropy(self.b(self.a(x).relu()), y)


class Normed(torch.nn.Module):
    """A linear layer, a layer norm (its statistics: forward outputs only the backward reads) and a
    BatchNorm whose running statistics are buffers the step mutates."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn = torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(F.layer_norm(self.lin(x).relu(), (8,))).square().mean()


@pytest.fixture(scope="module")
def mlp_joint():
    torch.manual_seed(0)
    model = MLP()
    return model, aot_joint(model, torch.randn(16, 32), torch.randint(0, 4, (16,)))


@pytest.fixture(scope="module")
def normed_joint():
    torch.manual_seed(0)
    model = Normed()
    return model, aot_joint(model, torch.randn(4, 8))


def _primals(gm):
    return [n.name for n in gm.graph.nodes
            if n.op == "placeholder" and not n.target.startswith("tangents")]


def test_primals_are_parameters_buffers_and_inputs_by_static_lifetime_and_gradient(normed_joint):
    model, (joint, num_fwd_outputs, static) = normed_joint
    step = step_from_joint(joint, num_fwd_outputs=num_fwd_outputs, static_input_indices=static)
    primals = _primals(joint)
    n_params = len(list(model.parameters()))
    n_buffers = len(list(model.buffers()))
    assert len(step.param_names) == n_params  # static, with a gradient
    assert len(step.buffer_names) == n_buffers  # static, without (running stats, the counter)
    assert len(step.input_names) == 1  # x: not static
    assert len(primals) == n_params + n_buffers + 1
    # each primal is exactly one of the three, and its role says which
    assert set(step.param_names) | set(step.buffer_names) | set(step.input_names) == set(primals)
    assert {step.roles[p] for p in step.param_names} == {Role.PARAMETER}
    assert {step.roles[b] for b in step.buffer_names} == {Role.BUFFER}
    assert {step.roles[i] for i in step.input_names} == {Role.INPUT}
    tangents = [n.name for n in joint.graph.nodes
                if n.op == "placeholder" and n.name not in primals]
    assert tangents and all(step.roles[t] is Role.TANGENT for t in tangents)
    # each parameter's gradient output is mapped to that parameter, and nothing else is
    assert sorted(step.grad_of.values()) == sorted(step.param_names)


def test_a_primal_without_static_lifetime_is_an_input_and_its_gradient_is_kept(mlp_joint):
    _, (joint, num_fwd_outputs, _) = mlp_joint
    step = step_from_joint(joint, num_fwd_outputs=num_fwd_outputs, static_input_indices=set())
    primals = _primals(joint)
    assert set(step.input_names) == set(primals) and not step.param_names
    assert all(step.roles[p] is Role.INPUT for p in primals)
    assert set(step.grad_of.values()) <= set(primals) and step.grad_of  # the weights' gradients


def test_forward_nodes_are_what_the_outputs_need_and_no_tangent_reaches(mlp_joint):
    _, (joint, num_fwd_outputs, static) = mlp_joint
    forward = forward_node_names(joint, num_fwd_outputs)
    step = step_from_joint(joint, num_fwd_outputs=num_fwd_outputs, static_input_indices=static)
    ops = [n for n in joint.graph.nodes if n.op == "call_function"]
    assert {n.name for n in ops if n.name not in forward} == set(step.backward_nodes)
    for node in ops:
        if node.name in forward:
            assert step.roles[node.name] in (Role.ACTIVATION, Role.LOSS)
            # no forward node reads a backward node
            assert not any(i.name in step.backward_nodes for i in node.all_input_nodes)
        else:
            assert step.roles[node.name] is Role.GRADIENT
    loss = joint.graph.output_node().args[0][0]
    assert step.loss_node == loss.name and step.roles[loss.name] is Role.LOSS
    assert step.held_outputs == []  # the loss is the step's only output
    assert {"addmm", "relu", "addmm_1"} <= forward


def test_statistics_only_the_backward_reads_are_forward_nodes(normed_joint):
    _, (joint, num_fwd_outputs, _) = normed_joint
    forward = forward_node_names(joint, num_fwd_outputs)
    norm = next(n for n in joint.graph.nodes
                if n.target is torch.ops.aten.native_layer_norm.default)
    stats = [u for u in norm.users if u.target is operator.getitem]
    assert len(stats) == 3 and all(u.name in forward for u in stats)  # mean, rstd included


def test_backward_nodes_interleaved_with_the_forward_are_moved_after_it(normed_joint):
    _, (joint, num_fwd_outputs, static) = normed_joint
    joint = copy.deepcopy(joint)  # reordered below: the fixture's stays as it is
    forward = forward_node_names(joint, num_fwd_outputs)
    ops = [n for n in joint.graph.nodes if n.op == "call_function"]
    tangent = next(n for n in joint.graph.nodes if n.name.startswith("tangents"))
    # the backward's first op reads only the tangent (expand): a joint-graph pass could have
    # put it anywhere; put it right after the forward's first op
    moved = next(n for n in ops if n.name not in forward)
    assert moved.all_input_nodes == [tangent]
    ops[0].append(moved)
    step = step_from_joint(joint, num_fwd_outputs=num_fwd_outputs, static_input_indices=static)
    order = [n.name for n in step.gm.graph.nodes if n.op == "call_function"]
    assert order.index(moved.name) > max(order.index(n) for n in forward if n in order)
    assert all(order.index(b) > order.index(f) for b in step.backward_nodes
               for f in forward if f in order)
    assert moved.name in step.backward_nodes


def test_a_joint_without_a_gradient_per_primal_is_refused(mlp_joint):
    _, (joint, num_fwd_outputs, static) = mlp_joint
    with pytest.raises(ValueError, match="gradient outputs for .* primals"):
        step_from_joint(joint, num_fwd_outputs=num_fwd_outputs + 1, static_input_indices=static)
