"""A 4-d graph input the forward returns (saves for the backward) and that reaches a convolution
only through other ops -- a 3x3 weight cast to bf16 for it, whose bf16 copy the backward makes
again -- is copied channels-last at the start of the forward and the copy is saved: Inductor
gives an output in ``find_nodes_prefer_channels_last`` channels-last strides (issue 18: WRN-16-2
in bf16 at 37.80 MiB held a 128-channel 3x3 weight's fp32 copy, 589,824 bytes, from the start of
the forward to the backward's cast of it, and measured 60 KB over its budget)."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxmem.memory.inductor import channels_last_copies


def _traced(fn, *shapes):
    return make_fx(fn, tracing_mode="fake")(*(torch.randn(s) for s in shapes))


def test_a_saved_weight_that_a_convolution_reads_through_a_cast_is_copied_channels_last():
    def forward(x, w):
        y = torch.nn.functional.conv2d(x.to(torch.bfloat16), w.to(torch.bfloat16), padding=1)
        return y, w  # w saved for the backward, which casts it again

    gm = _traced(forward, (2, 4, 8, 8), (8, 4, 3, 3))
    x, w = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert channels_last_copies(gm, layout_optimized=True) == [w]

    def not_saved(x, w):
        return torch.nn.functional.conv2d(x.to(torch.bfloat16), w.to(torch.bfloat16), padding=1)

    # read only through the cast (which Inductor writes channels-last itself): no copy
    assert channels_last_copies(_traced(not_saved, (2, 4, 8, 8), (8, 4, 3, 3)),
                                layout_optimized=True) == []

    def saved_elsewhere(x, w, v):
        y = torch.nn.functional.conv2d(x.to(torch.bfloat16), w.to(torch.bfloat16), padding=1)
        return y, v * 2, v  # v leads to no convolution

    gm = _traced(saved_elsewhere, (2, 4, 8, 8), (8, 4, 3, 3), (8, 4, 3, 3))
    assert channels_last_copies(gm, layout_optimized=True) == []
