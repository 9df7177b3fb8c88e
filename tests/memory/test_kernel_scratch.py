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


def _conv_backward_node(dtype):
    """A convolution_backward node of a 64-channel 3x3 layer (batch 8, 16x16), fake values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = torch.fx.Graph()
    shapes = {"grad": (8, 64, 16, 16), "x": (8, 64, 16, 16), "w": (64, 64, 3, 3)}
    nodes = []
    with FakeTensorMode():
        for name, shape in shapes.items():
            node = graph.placeholder(name)
            node.meta["val"] = torch.empty(shape, dtype=dtype)
            nodes.append(node)
    return graph.call_function(CONV_BACKWARD, (*nodes, [0], [1, 1], [1, 1], [1, 1], False,
                                               [0, 0], 1, [True, True, False]))


CONV_BACKWARD = torch.ops.aten.convolution_backward.default


def test_a_bf16_convolutions_scratch_is_measured_channels_last_and_fp32_keeps_its_rule():
    cpu = torch.device("cpu")
    node = _conv_backward_node(torch.bfloat16)
    cl = torch.channels_last
    grad, x, w = (torch.randn(n.meta["val"].shape, dtype=torch.bfloat16).to(memory_format=cl)
                  for n in node.args[:3])
    outputs = []
    measured = fxmem.measure_memory(
        lambda: outputs.append(CONV_BACKWARD(grad, x, w, *node.args[3:])), device="cpu",
        baseline=[grad, x, w])
    held = sum(t.untyped_storage().nbytes() for t in outputs[0] if t is not None)
    # oneDNN's bf16 gradient holds more than fp32's two weight copies (this build: ~4x)
    assert measured.peak - measured.start - held > 2 * w.numel() * w.element_size()
    assert scratch_bytes(node, cpu, channels_last=True) == measured_scratch(
        node, cpu, channels_last=True) > 2 * w.numel() * w.element_size()
    fp32 = _conv_backward_node(torch.float32)
    weight = 64 * 64 * 9 * 4
    assert measured_scratch(fp32, cpu, channels_last=True) == 0  # not measured: the rule
    assert scratch_bytes(fp32, cpu, channels_last=True) == 2 * weight
