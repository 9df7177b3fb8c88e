"""Inductor does not write a kernel's output into the buffer of a scatter it reads (an embedding's
gradient: ``index_put`` with accumulation): fused with the scatter, that buffer is accessed at
the scattered index and at the read's (``single_index_in_fused_node``). Missing, the model
under-predicted the bf16 GPT decoder's last backward kernel -- the tied embedding's gradient, the
scatter plus the lm_head's gradient cast from bf16 -- by its 8 MiB output."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxmem.memory.inductor import Lowered, lowering_kinds, same_index_reads

CPU = torch.device("cpu")


def test_a_kernel_does_not_write_into_a_scatter_it_reads():
    def f(idx, src, a, b):
        scattered = torch.ops.aten.index_put(torch.zeros(64, 8), [idx], src, True)
        return torch.mm(a, b) + scattered, scattered * 2.0

    gm = make_fx(f, tracing_mode="fake")(torch.randint(0, 64, (32,)), torch.randn(32, 8),
                                         torch.randn(64, 16), torch.randn(16, 8))
    kinds = lowering_kinds(gm, CPU)
    found = same_index_reads(gm, kinds)
    assert kinds["index_put"] is Lowered.KERNEL and kinds["add"] is Lowered.KERNEL
    assert found["add"] == {"mm"}  # the matmul's buffer, not the scatter's
    assert found["mul"] == frozenset()
