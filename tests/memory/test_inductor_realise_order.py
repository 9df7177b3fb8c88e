"""Inductor decides whether to realise a value when it lowers that value, in graph order.

A value an extern kernel reads (here a ``bmm``) is realised as soon as it is lowered, so a later
loop body that reads it reads a buffer: such a body is cheap even if the value was computed with
``exp``, and a cast of it read by two kernels is inlined into both. The model once decided every
body before realising anything, so the cast inherited the ``exp`` and was realised for its two
readers: on the bench GPT decoder's bf16 attention (the fp32 copy of the dropout's bf16
probabilities that the softmax backward reads twice) that put a 16 MiB buffer in the prediction
that Inductor never allocates, and a plan at 1.03x the floor was over-predicted by 6%."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.utils import run_and_get_code

from fxmem.memory.inductor import Lowered, lowering_kinds


def _step(scores, v):
    probs = torch.exp(scores - scores.amax(-1, keepdim=True)).to(torch.bfloat16)
    out = torch.bmm(probs, v)  # an extern kernel: probs is realised where it is lowered
    wide = probs.float()  # read by two kernels below
    return out, (wide * 2.0).sum(-1) + wide.amax(-1)


def _inputs():
    torch.manual_seed(0)
    return torch.randn(4, 32, 32), torch.randn(4, 32, 8, dtype=torch.bfloat16)


def test_a_cast_of_a_value_realised_for_an_extern_reader_is_inlined():
    # as fxmem's joint graphs are: decomposed with Inductor's table (casts are prims)
    gm = make_fx(_step, decomposition_table=select_decomp_table(), tracing_mode="fake")(*_inputs())
    kinds = lowering_kinds(gm, torch.device("cpu"))
    casts = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target is torch.ops.prims.convert_element_type.default]
    to_low, to_wide = casts[0], casts[-1]
    assert kinds[to_low.name] is Lowered.KERNEL  # realised for the bmm
    assert kinds[to_wide.name] is Lowered.INLINED, kinds[to_wide.name]


def test_inductor_makes_no_buffer_for_that_cast():
    scores, v = _inputs()
    _, code = run_and_get_code(torch.compile(_step, backend="inductor"), scores, v)
    fp32_scores = "empty_strided_cpu((4, 32, 32), (1024, 32, 1), torch.float32)"
    assert not any(fp32_scores in c for c in code), "Inductor realised the fp32 cast"
