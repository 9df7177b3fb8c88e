"""RNG-replay pass: random ops recomputed in the backward reproduce the forward's values exactly.

For every random op (dropout's ``native_dropout``, ``bernoulli``, ``rand_like``...) that the
backward graph recomputes, the forward runs it through ``run_and_save_rng_state`` and saves the
generator state it started from (5 KiB on the CPU); the backward replays it with
``run_with_rng_state``, which sets that state, runs the op and restores the global generator -- so
the backward neither changes the values nor advances the RNG the next step's dropout will draw
from. Both are PyTorch's own higher-order ops; Inductor runs them as fallback kernels.
"""

from __future__ import annotations

import dataclasses
import logging
import operator

import torch
import torch.fx

from fxmem.graph import torch_compat
from fxmem.graph.ops import schema_arguments
from fxmem.passes.base import GraphPass, PassInvariantError, StepGraphs
from fxmem.passes.recompute import RECOMPUTED

__all__ = ["RngReplayRecord", "replay_random_ops", "is_random", "is_replayable", "RngReplay"]

log = logging.getLogger(__name__)


def is_random(node: torch.fx.Node) -> bool:
    """Whether the op draws random numbers: the one predicate fxmem uses for "random" (what the
    recompute problem must save or replay, what the cost model prices per number drawn, what the
    batch analysis treats as i.i.d. noise).

    PyTorch tags every op that *can* draw as ``nondeterministic_seeded``, including the attention
    kernels (their ``dropout_p`` defaults to 0) and the RNNs. An op whose dropout probability is
    0 (or that runs with ``train=False``) draws nothing: it is a plain deterministic op."""
    target = node.target
    if not (node.op == "call_function" and torch_compat.is_op_overload(target)
            and torch.Tag.nondeterministic_seeded in target.tags):
        return False
    values = schema_arguments(node)
    if values.get("train") is False:
        return False
    is_dropout = "dropout" in target._schema.name
    for name in ("dropout_p", "dropout", "p") if is_dropout else ("dropout_p", "dropout"):
        p = values.get(name)
        if isinstance(p, (int, float)) and not isinstance(p, bool):
            return p > 0
    return True


def is_replayable(node: torch.fx.Node) -> bool:
    """A random op this pass can replay: the generator state it saves is that of the device of a
    tensor input (Inductor's seeds, with none, cannot be)."""
    return is_random(node) and any(
        isinstance(a.meta.get("val"), torch.Tensor) for a in node.all_input_nodes)


@dataclasses.dataclass(frozen=True)
class RngReplayRecord:
    replayed: tuple[str, ...]  # random ops the backward recomputes from a saved RNG state

    def summary(self) -> str:
        return f"{len(self.replayed)} random ops replayed from saved RNG states"


def _fake_mode(gm: torch.fx.GraphModule):
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return torch_compat.DETECT_FAKE_MODE()(vals)


def replay_random_ops(
    fw: torch.fx.GraphModule, bw: torch.fx.GraphModule, *, num_fwd_outputs: int
) -> RngReplayRecord:
    """Rewrite ``fw`` and ``bw`` in place so that the backward's random ops replay the forward's."""
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    targets = [n for n in bw.graph.nodes if is_random(n) and n.name in fw_nodes]
    if not targets:
        return RngReplayRecord(replayed=())
    run_and_save_rng_state = torch_compat.RUN_AND_SAVE_RNG_STATE()
    run_with_rng_state = torch_compat.RUN_WITH_RNG_STATE()
    fake_mode = _fake_mode(fw)
    fw_output = fw.graph.output_node()
    outs = list(fw_output.args[0])
    n_saved_tensors = sum(1 for o in outs[num_fwd_outputs:]
                          if isinstance(o, torch.fx.Node) and isinstance(o.meta.get("val"), torch.Tensor))
    insert_at = num_fwd_outputs + n_saved_tensors  # saved tensors come before saved symbols
    first_tangent = next((n for n in bw.graph.nodes
                          if n.op == "placeholder" and n.name.startswith("tangents")), None)
    new_outputs = []
    for bw_node in targets:
        fw_node = fw_nodes[bw_node.name]
        with fw.graph.inserting_before(fw_node):
            both = fw.graph.call_function(run_and_save_rng_state,
                                          (fw_node.target, *fw_node.args), dict(fw_node.kwargs))
            state = fw.graph.call_function(operator.getitem, (both, 0))
            value = fw.graph.call_function(operator.getitem, (both, 1))
        # every tensor argument, positional or keyword (SDPA's attn_mask), as its fake value
        fake_args, fake_kwargs = torch.fx.node.map_arg(
            (fw_node.args, fw_node.kwargs), lambda a: a.meta["val"])
        with fake_mode:
            state_val, _ = run_and_save_rng_state(fw_node.target, *fake_args, **fake_kwargs)
        if not isinstance(state_val, torch_compat.FAKE_TENSOR()):  # the CPU impl reads the
            state_val = fake_mode.from_tensor(state_val)  # real generator even under fake mode
        both.meta["val"] = (state_val, fw_node.meta["val"])
        state.meta["val"] = state_val
        value.meta.update(fw_node.meta)
        fw_node.replace_all_uses_with(value)
        fw.graph.erase_node(fw_node)
        new_outputs.append(state)

        if first_tangent is not None:
            with bw.graph.inserting_before(first_tangent):
                placeholder = bw.graph.placeholder(f"{bw_node.name}_rng_state")
        else:
            with bw.graph.inserting_before(next(iter(bw.graph.nodes))):
                placeholder = bw.graph.placeholder(f"{bw_node.name}_rng_state")
        placeholder.meta["val"] = state_val
        with bw.graph.inserting_before(bw_node):
            replay = bw.graph.call_function(run_with_rng_state,
                                            (placeholder, bw_node.target, *bw_node.args),
                                            dict(bw_node.kwargs))
        replay.meta.update(bw_node.meta)
        bw_node.replace_all_uses_with(replay)
        bw.graph.erase_node(bw_node)

    outs[insert_at:insert_at] = new_outputs
    fw_output.args = (tuple(outs),)
    _order_placeholders(bw)
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()
    record = RngReplayRecord(replayed=tuple(n.name for n in targets))
    log.debug("rng replay: %s", record.summary())
    return record


def _order_placeholders(gm: torch.fx.GraphModule) -> None:
    """FX needs placeholders first; keep their relative order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first_other = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    if first_other is None:
        return
    for p in placeholders:
        first_other.prepend(p)


class RngReplay(GraphPass):
    """The RNG-replay pass as a :class:`~fxmem.passes.base.GraphPass`: the forward and backward
    graphs in (rewritten in place), a :class:`RngReplayRecord` out; no decision."""

    name = "rng-replay"

    def run(self, graphs: StepGraphs, decision: None = None) -> tuple[StepGraphs, RngReplayRecord]:
        if graphs.forward is None or graphs.backward is None:
            raise ValueError("RNG replay needs the forward and backward graphs")
        record = replay_random_ops(graphs.forward, graphs.backward,
                                   num_fwd_outputs=graphs.num_fwd_outputs)
        return graphs, record

    def ensures(self, before: StepGraphs, after: StepGraphs) -> None:
        super().ensures(before, after)
        left = [n.name for n in after.backward.graph.nodes
                if is_random(n) and n.meta.get(RECOMPUTED)]
        if left:
            raise PassInvariantError(f"pass {self.name}: random ops {left[:3]} are recomputed "
                                     "in the backward without replaying the forward's RNG state")
