"""Adapter: an AOTAutograd joint graph (what a partitioner receives) -> :class:`CapturedStep`.

AOTAutograd hands a partitioner a functional joint graph whose placeholders are ``primals_*``
(parameters, buffers, user inputs) and ``tangents_*`` (gradients of the forward's outputs), and
whose output is ``[*forward_outputs, *gradients_of_primals]``. Forward nodes are those the forward
outputs depend on; every other node belongs to the backward (the partitioner's own definition).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from fxmem.graph.capture import CapturedStep, Role

__all__ = ["step_from_joint", "forward_node_names"]


def forward_node_names(joint: torch.fx.GraphModule, num_fwd_outputs: int) -> set[str]:
    """Forward nodes: what the first ``num_fwd_outputs`` outputs depend on, plus the other outputs
    of forward ops (e.g. a layer norm's statistics, read only by the backward) and the nodes
    AOTAutograd tagged as forward -- never anything that depends on a tangent."""
    output = joint.graph.output_node()
    stack = [n for n in output.args[0][:num_fwd_outputs] if isinstance(n, torch.fx.Node)]
    seen: set[str] = set()
    while stack:
        node = stack.pop()
        if node.name in seen or _is_tangent(node):
            continue
        seen.add(node.name)
        stack.extend(node.all_input_nodes)
    tangent_dependent: set[str] = set()
    for node in joint.graph.nodes:
        if _is_tangent(node) or any(i.name in tangent_dependent for i in node.all_input_nodes):
            tangent_dependent.add(node.name)
            continue
        if node.name in seen:
            continue
        tagged = node.meta.get("partitioner_tag") == "is_forward"
        of_forward_op = node.target is operator.getitem and node.args[0].name in seen
        if node.op == "call_function" and (tagged or of_forward_op):
            seen.add(node.name)
    return seen


def _is_tangent(node: torch.fx.Node) -> bool:
    return node.op == "placeholder" and node.target.startswith("tangents")


def step_from_joint(
    joint: torch.fx.GraphModule,
    *,
    num_fwd_outputs: int,
    static_input_indices: frozenset[int] | set[int] = frozenset(),
) -> CapturedStep:
    """Label an AOTAutograd joint graph. Static-lifetime primals with a gradient are parameters,
    without one buffers; the other primals are inputs. Forward nodes are reordered before
    backward ones (joint-graph passes may have interleaved them)."""
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    primals = [n for n in placeholders if not _is_tangent(n)]
    output = joint.graph.output_node()
    outs = list(output.args[0])
    fwd_outs, grads = outs[:num_fwd_outputs], outs[num_fwd_outputs:]
    if len(grads) != len(primals):
        raise ValueError(f"joint graph has {len(grads)} gradient outputs for {len(primals)} primals")

    forward = forward_node_names(joint, num_fwd_outputs)
    _forward_first(joint, forward)

    roles: dict[str, Role] = {}
    params, buffers, inputs, grad_of = {}, {}, {}, {}
    for i, (node, grad) in enumerate(zip(primals, grads)):
        if i in static_input_indices:
            if isinstance(grad, torch.fx.Node):
                roles[node.name], params[node.name] = Role.PARAMETER, node.name
                grad_of[grad.name] = node.name
            else:
                roles[node.name], buffers[node.name] = Role.BUFFER, node.name
        else:
            roles[node.name], inputs[node.name] = Role.INPUT, node.name
            if isinstance(grad, torch.fx.Node):
                grad_of[grad.name] = node.name
    for node in placeholders:
        if _is_tangent(node):
            roles[node.name] = Role.TANGENT
    backward = set()
    for node in joint.graph.nodes:
        if node.op == "get_attr":
            roles[node.name] = Role.BUFFER
        elif node.op == "call_function":
            if node.name in forward:
                roles[node.name] = Role.ACTIVATION
            else:
                roles[node.name] = Role.GRADIENT
                backward.add(node.name)
    tensor_outs = [n for n in fwd_outs if isinstance(n, torch.fx.Node)]
    loss = tensor_outs[0]
    if roles.get(loss.name) in (Role.ACTIVATION, None):
        roles[loss.name] = Role.LOSS
    device = next(
        (n.meta["val"].device for n in primals if isinstance(n.meta.get("val"), torch.Tensor)),
        torch.device("cpu"),
    )
    return CapturedStep(
        gm=joint,
        roles=roles,
        backward_nodes=frozenset(backward),
        param_names=params,
        buffer_names=buffers,
        input_names=inputs,
        loss_node=loss.name,
        held_outputs=[n.name for n in tensor_outs[1:]],
        grad_of=grad_of,
        device=device,
    )


def _forward_first(joint: torch.fx.GraphModule, forward: set[str]) -> None:
    """Move backward-only nodes that sit among forward nodes after the last forward node."""
    nodes = [n for n in joint.graph.nodes if n.op == "call_function"]
    last_forward = max((i for i, n in enumerate(nodes) if n.name in forward), default=-1)
    if last_forward < 0:
        return
    anchor = nodes[last_forward]
    for node in reversed(nodes[:last_forward]):
        if node.name not in forward:
            anchor.append(node)
    joint.graph.lint()
