"""Helpers shared by the tests: one step's gradients, comparing them, a step's measured peak."""

import gc
import weakref

import torch

import fxmem


#: What these tests plan with unless they test a default or a lowering: recomputation alone, its
#: graphs run as FX code (fxmem.optimize's defaults add microbatching and compile with Inductor).
EAGER_RECOMPUTE = {"lowering": "eager", "allow": ("recompute",)}


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


def make_tiny_gpt(*, n_layer=2, dropout=0.1, vocab=512, seq=64, batch=4, n_head=2, d_model=64,
                  max_seq_len=None, targets="same", seed=0):
    """A tiny fxmem GPT and one batch: ``(model, (idx, targets), {})``. ``targets="same"``: the
    tokens are their own targets; ``"random"``: other tokens (drawn after ``idx``).
    ``max_seq_len``: the model's context (default ``seq``)."""
    from fxmem.examples import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, n_layer=n_layer, n_head=n_head, d_model=d_model,
                    max_seq_len=max_seq_len or seq, dropout=dropout)
    idx = torch.randint(0, vocab, (batch, seq))
    tgt = idx if targets == "same" else torch.randint(0, vocab, (batch, seq))
    return GPT(cfg).train(), (idx, tgt), {}


def _bounds_key(model, args, kwargs, options):
    shapes = tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t)
                   for t in [*args, *kwargs.values()])
    return id(model), model.training, tuple(kwargs), shapes, tuple(sorted(options.items()))


_BOUNDS: dict = {}


def step_bounds(model, args=(), kwargs=None, **options):
    """``(floor, unoptimised peak)`` of ``fxmem.optimize(model, ..., **options)`` on these
    inputs, from one plan that neither compiles nor runs the step (``plan_for``): a 1-byte
    budget's BudgetError names both (``fxmem.floor`` gives the floor alone). Cached per model
    object, input shapes and options: planning is what these tests spend their time on."""
    kwargs = kwargs or {}
    key = _bounds_key(model, args, kwargs, options)
    hit = _BOUNDS.get(key)
    if hit is not None and hit[0]() is model:
        return hit[1]
    try:
        fxmem.optimize(model, 1, **options).plan_for(*args, **kwargs)
    except fxmem.BudgetError as err:
        bounds = (err.floor, err.unoptimized)
    else:
        raise AssertionError("a 1-byte budget should be infeasible")
    _BOUNDS[key] = (weakref.ref(model), bounds)  # not kept alive by the cache
    return bounds


def budget_between(model, args=(), kwargs=None, fraction=0.5, **options):
    """A budget ``fraction`` of the way from the step's floor to its unoptimised peak."""
    floor, top = step_bounds(model, args, kwargs, **options)
    return int(floor + fraction * (top - floor))


def aot_joint(model, *args, **kwargs):
    """The AOTAutograd joint graph of ``model(*args, **kwargs)`` as a partitioner receives it:
    ``(joint, num_fwd_outputs, static_input_indices)`` (a copy; the step is then partitioned by
    AOTAutograd's default partition and its forward run once)."""
    import copy

    import torch._dynamo
    from torch._functorch.partitioners import default_partition

    from fxmem.graph import torch_compat

    seen = {}

    def record(joint, inputs, **kw):
        seen["joint"], seen["kwargs"] = copy.deepcopy(joint), kw
        return default_partition(joint, inputs, **kw)

    backend = torch_compat.AOT_AUTOGRAD()(fw_compiler=lambda gm, _: gm,
                                          bw_compiler=lambda gm, _: gm, partition_fn=record)
    torch._dynamo.reset()
    try:
        torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    kw = seen["kwargs"]
    return (seen["joint"], kw["num_fwd_outputs"],
            frozenset(kw.get("static_lifetime_input_indices") or ()))


def measured_grads(model, call, args=(), kwargs=None, seed=1):
    """One step through ``call`` measured: ``((loss, gradients), peak bytes)`` -- what
    :func:`grads_of` and :func:`measured_step_peak` give, from one run of the step instead of
    two (the gradients are read after the measurement ends)."""
    kwargs = kwargs or {}
    for p in model.parameters():
        p.grad = None
    holder = {}

    def step():  # the caller holds the output through the backward, as a plan assumes
        torch.manual_seed(seed)
        holder["out"] = call(*args, **kwargs)
        holder["loss"] = fxmem.loss_from_output(holder["out"])
        holder["loss"].backward()

    gc.collect()
    roots = [model, list(args), list(kwargs.values())]
    peak = fxmem.measure_memory(step, device="cpu", baseline=roots).peak
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return (holder["loss"].detach(), grads), peak
