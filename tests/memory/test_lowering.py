"""memory/lowering.py: a plan's storage table as Inductor runs its graphs (lower_table) -- values
it inlines cost nothing, and with its layout optimisation the convolutions' inputs are copied
channels-last by one kernel at the start."""

import pytest
import torch
import torch.nn.functional as F

from fxmem.graph.joint import forward_node_names, step_from_joint
from fxmem.memory.inductor import Lowered, channels_last_copies
from fxmem.memory.lowering import COPIES_OP, lower_table, op_kinds
from fxmem.memory.simulation import simulate
from fxmem.memory.storages import plan_storages, plan_table
from fxmem.passes.recompute import split_with_saved
from tests.helpers import aot_joint

aten = torch.ops.aten


class ConvNet(torch.nn.Module):
    """conv -> (x2, inlined into the relu's kernel) -> relu -> conv -> relu -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x, y):
        h = self.c2((self.c1(x) * 2).relu()).relu()
        return F.cross_entropy(self.fc(h.mean((2, 3))), y)


@pytest.fixture(scope="module")
def conv_plan():
    """The save-all plan of a conv net: its step, forward and backward graphs and storage table."""
    torch.manual_seed(0)
    joint, n_out, static = aot_joint(ConvNet(), torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2,)))
    step = step_from_joint(joint, num_fwd_outputs=n_out, static_input_indices=static)
    forward = forward_node_names(joint, n_out)
    saved = [n.name for n in joint.graph.nodes if n.op == "call_function" and n.name in forward]
    fw, bw, _ = split_with_saved(joint, saved, num_fwd_outputs=n_out)
    return step, fw, bw, n_out, plan_table(step, fw, bw, num_fwd_outputs=n_out)


def _op(table, target):
    return next(i for i, n in enumerate(table.op_nodes) if n is not None and n.target is target)


def test_an_inlined_value_costs_nothing_and_its_reader_reads_its_input(conv_plan):
    *_, table = conv_plan
    lowered = lower_table(table, layout_optimized=False)
    mul, relu, conv = (_op(table, t) for t in (aten.mul.Tensor, aten.relu.default,
                                                 aten.convolution.default))
    assert op_kinds(table)[mul] is Lowered.INLINED
    (product,) = table.storages.creates[mul]
    (conv_out,) = table.storages.creates[conv]
    assert table.storages.nbytes[product] == 2 * 8 * 8 * 8 * 4  # as FX code: a tensor of its own
    assert lowered.storages.nbytes[product] == 0  # through Inductor: never in memory
    assert lowered.storages.creates[mul] == ()
    assert product in table.storages.reads[relu] and product not in lowered.storages.reads[relu]
    assert conv_out in lowered.storages.reads[relu]  # the relu's kernel computes the product
    assert lowered.storages.op_names == table.storages.op_names  # no op added without layouts


def test_layout_optimisation_adds_one_kernel_making_the_channels_last_copies(conv_plan):
    step, fw, *_, table = conv_plan
    lowered = lower_table(table, layout_optimized=True)
    s = lowered.storages
    names = channels_last_copies(fw, layout_optimized=True)
    originals = [table.graph_storages[0][name][0] for name in names]
    assert len(names) == 3  # the image and both 3x3 weights
    assert s.op_names[0] == COPIES_OP and lowered.op_nodes[0] is None
    assert s.op_names[1:] == table.storages.op_names
    assert s.backward_start == table.storages.backward_start + 1
    copies = s.creates[0]
    assert len(copies) == 3 and set(s.reads[0]) == set(originals)
    assert sorted(s.nbytes[c] for c in copies) == sorted(s.nbytes[o] for o in originals)
    # the convolutions read the copies instead of the originals, forward and backward
    for i, node in enumerate(lowered.op_nodes):
        if node is not None and node.target in (aten.convolution.default,
                                                aten.convolution_backward.default):
            assert set(s.reads[i]) & set(copies), node.name
            assert not set(s.reads[i]) & set(originals), node.name
    # the forward keeps the copies the backward reads: saved activations
    assert {s.category[c] for c in copies} == {"saved activations"}
    assert simulate(s).peak > simulate(lower_table(table, layout_optimized=False).storages).peak


def test_plan_storages_with_inductor_is_the_lowered_plan_table(conv_plan):
    step, fw, bw, n_out, table = conv_plan
    from fxmem.memory.inductor import optimizes_layout

    layout = optimizes_layout(fw)
    expected = lower_table(plan_table(step, fw, bw, num_fwd_outputs=n_out, channels_last=layout),
                           layout_optimized=layout).storages
    assert plan_storages(step, fw, bw, num_fwd_outputs=n_out, lowering="inductor") == expected
    assert plan_storages(step, fw, bw, num_fwd_outputs=n_out, lowering="eager") == table.storages
