"""Helpers shared by the tests: one step's gradients, comparing them, a step's measured peak."""

import gc

import torch

import fxmem


def grads_of(model, call, *args, seed=1, **kwargs):
    """Loss and gradients of one step; the RNG is seeded so dropout masks are reproducible."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = call(*args, **kwargs)
    loss = fxmem.loss_from_output(out)
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return loss.detach(), grads


def assert_same_grads(expected, got, **tolerances):
    """Same loss and gradients (``torch.testing.assert_close``; ``tolerances`` are its rtol/atol)."""
    (l0, g0), (l1, g1) = expected, got
    torch.testing.assert_close(l1, l0, **tolerances)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(b, a, **tolerances)


def measured_step_peak(model, call, args, kwargs):
    """Peak bytes of one step, counting what the step holds: the model and its inputs."""
    def step():
        out = call(*args, **kwargs)
        fxmem.loss_from_output(out).backward()

    gc.collect()
    roots = [model, list(args), list(kwargs.values())]
    peak = fxmem.measure_memory(step, device="cpu", baseline=roots).peak
    for p in model.parameters():
        p.grad = None
    return peak
