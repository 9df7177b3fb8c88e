"""The CPU flash-attention kernels' scratch, measured once per shape and counted by the model."""

import torch

import fxmem
from fxmem.memory.kernel_scratch import measured_scratch
from fxmem.memory.storages import scratch_bytes
from tests.helpers import make_tiny_gpt

SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
SDPA_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _attention_nodes(plan):
    return [n for key in ("forward", "backward") for n in plan.graphs[key].graph.nodes
            if n.op == "call_function" and n.target in (SDPA, SDPA_BACKWARD)]


def test_the_attention_kernels_scratch_is_measured_beyond_their_outputs():
    q, k, v = (torch.randn(4, 2, 64, 32) for _ in range(3))
    outputs = []
    measured = fxmem.measure_memory(lambda: outputs.append(SDPA(q, k, v, 0.0, True)),
                                    device="cpu", baseline=[q, k, v])
    held = sum(t.untyped_storage().nbytes() for t in outputs[0])
    model, args, _ = make_tiny_gpt(dropout=0.0)
    plan = fxmem.optimize(model, "1GiB", allow=("recompute",), lowering="eager").plan_for(*args)
    nodes = _attention_nodes(plan)
    assert {n.target for n in nodes} == {SDPA, SDPA_BACKWARD}
    for node in nodes:  # planned under the compile's fake mode: measured on real tensors
        assert measured_scratch(node, torch.device("cpu")) > 0
        assert scratch_bytes(node, torch.device("cpu")) == measured_scratch(
            node, torch.device("cpu"))
    assert measured.peak - measured.start - held > 0  # the kernel's own blocks, in this build


def test_other_ops_and_other_devices_have_no_measured_scratch():
    model, args, _ = make_tiny_gpt(dropout=0.0)
    plan = fxmem.optimize(model, "1GiB", allow=("recompute",), lowering="eager").plan_for(*args)
    node = _attention_nodes(plan)[0]
    assert measured_scratch(node, torch.device("meta")) == 0
    other = next(n for n in plan.graphs["forward"].graph.nodes if n.op == "call_function"
                 and n.target is torch.ops.aten.mm.default)
    assert measured_scratch(other, torch.device("cpu")) == 0
