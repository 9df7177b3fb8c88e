"""``fxmem.sparsify``: replace a model's layers by sparse ones; ``to_dense``: export it back.

::

    model = fxmem.sparsify(model, density=0.1)        # ERK densities, first/last layers dense
    opt = torch.optim.AdamW(model.parameters())       # built after: it holds the values vectors
    model.sparsity.attach(opt, every=100)             # dynamic sparsity (RigL by default)
    model = fxmem.optimize(model, budget, optimizer=opt)   # planned like any model

The model is changed in place and returned; ``model.sparsity`` is its
:class:`~fxmem.levers.sparse.dynamic.DynamicSparsity` (the prune/regrow schedule and the report).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from fxmem.levers.sparse.density import eligible_layers, is_hf_conv1d, layer_densities, nnz_for
from fxmem.levers.sparse.kernels import choose_kernel
from fxmem.levers.sparse.layers import (KERNELS, SparseConv2d, SparseHFConv1D, SparseLayer,
                                        SparseLinear)
from fxmem.levers.sparse.optim import rebind_optimizer

__all__ = ["sparsify", "to_dense", "sparse_layers", "initial_indices"]

log = logging.getLogger(__name__)

MASK_INITS = ("magnitude", "random")


def sparse_layers(model: nn.Module) -> dict[str, SparseLayer]:
    """The model's sparse layers by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}


def initial_indices(weight: torch.Tensor, nnz: int, init: str = "magnitude",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The flat positions (sorted, int64) of the ``nnz`` weights kept: the largest in magnitude
    (``"magnitude"``) or drawn uniformly (``"random"``)."""
    flat = weight.detach().reshape(-1)
    if init == "magnitude":
        chosen = torch.topk(flat.abs(), nnz, sorted=False).indices
    elif init == "random":
        chosen = torch.randperm(flat.numel(), generator=generator, device="cpu")[:nnz]
    else:
        raise ValueError(f"init must be one of {MASK_INITS}, got {init!r}")
    return chosen.to(flat.device).sort().values


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def sparsify(
    model: nn.Module,
    density: float | Mapping[str, float] = 0.1,
    *,
    distribution: str = "erk",
    keep_dense: str | None = "first_last",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    init: str = "magnitude",
    kernel: str = "dense",
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
) -> nn.Module:
    """Replace ``model``'s eligible ``nn.Linear``/``nn.Conv2d`` layers (and Hugging Face's
    ``Conv1D``, GPT-2's linear layers) by sparse ones storing their non-zero values as the
    trainable parameter (O(nnz) gradients and optimizer state).

    ``density``: the overall fraction of non-zeros over the sparsified weights, spread by
    ``distribution`` (``"erk"`` or ``"uniform"``; see :mod:`fxmem.levers.sparse.density`), or a
    mapping from layer name to density. ``keep_dense``/``include``/``exclude`` choose the layers.
    ``init``: which weights are kept, ``"magnitude"`` (the largest) or ``"random"``.
    ``kernel``: ``"dense"`` (a transient dense weight in the forward), ``"csr"`` (sparse product;
    Linear only), or ``"auto"``: the faster of the two per layer, timed on the input shapes one
    forward of ``model(*example_inputs, **example_kwargs)`` shows.

    Build the optimizer after this call, or pass the one already built as ``optimizer``: each
    replaced weight is swapped for its values there, its state read at the kept positions
    (:func:`~fxmem.levers.sparse.optim.rebind_optimizer`). Returns ``model`` (changed in place)
    with ``model.sparsity`` set (attached to ``optimizer`` when given).
    """
    from fxmem.levers.sparse.dynamic import DynamicSparsity

    if kernel not in (*KERNELS, "auto"):
        raise ValueError(f"kernel must be one of {(*KERNELS, 'auto')}, got {kernel!r}")
    if kernel == "auto" and example_inputs is None and not example_kwargs:
        raise ValueError("kernel='auto' measures each layer on its input: pass example_inputs")
    layers = eligible_layers(model, keep_dense=keep_dense, include=include, exclude=exclude)
    if not layers:
        raise ValueError("no layer to sparsify (eligible: nn.Linear, Hugging Face Conv1D, "
                         "nn.Conv2d with zero padding, and an untied weight; "
                         "keep_dense='first_last' keeps the first and last)")
    weights = {n: m.weight.t() if is_hf_conv1d(m) else m.weight for n, m in layers.items()}
    shapes = {n: tuple(w.shape) for n, w in weights.items()}  # (out, in, ...)
    densities = layer_densities(shapes, density, distribution)
    generator = torch.Generator().manual_seed(seed)
    replaced = {}
    for name, module in layers.items():
        nnz = nnz_for(module.weight.numel(), densities[name])
        idx = initial_indices(weights[name], nnz, init, generator)
        cls = (SparseLinear if isinstance(module, nn.Linear)
               else SparseHFConv1D if is_hf_conv1d(module) else SparseConv2d)
        sparse = cls.from_dense(module, idx)
        sparse.train(module.training)
        _set_module(model, name, sparse)
        replaced[module.weight] = sparse
        log.debug("%s: %s -> %d non-zeros (density %.4f)", name, shapes[name], nnz,
                  sparse.density)
    new = sparse_layers(model)
    if kernel == "auto":
        _choose_kernels(model, new, example_inputs or (), example_kwargs or {})
    elif kernel == "csr":
        for layer in new.values():
            layer.set_kernel("csr" if isinstance(layer, SparseLinear) else "dense")
    model.sparsity = DynamicSparsity(model)
    if optimizer is not None:
        rebind_optimizer(optimizer, replaced)
        model.sparsity.optimizer = optimizer
    log.info("sparsified %d layers of %s", len(new), type(model).__name__)
    return model


def _input_shapes(model: nn.Module, layers: Mapping[str, SparseLayer], args: tuple,
                  kwargs: dict) -> dict[str, tuple[int, ...]]:
    """The shape of each layer's input in one forward (no gradients; RNG state restored)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def record(module, inputs) -> None:  # returns None: the inputs are left as they are
            shapes.setdefault(name, tuple(inputs[0].shape))
        return record

    handles = [layer.register_forward_pre_hook(recorder(name)) for name, layer in layers.items()]
    rng = torch.random.get_rng_state()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        torch.random.set_rng_state(rng)
        for h in handles:
            h.remove()
    return shapes


def _choose_kernels(model, layers, args, kwargs) -> None:
    shapes = _input_shapes(model, layers, args, kwargs)
    for name, layer in layers.items():
        if name not in shapes:
            log.info("%s is not called by the example forward; kernel stays %r", name, layer.kernel)
            continue
        choose_kernel(layer, shapes[name])


def to_dense(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model with every sparse layer replaced by the dense layer it stands for (zeros where
    no value is stored): a copy, or ``model`` itself with ``inplace=True``. A model wrapped by
    :func:`fxmem.optimize` is unwrapped first."""
    from fxmem.api.proxy import unwrap

    model = unwrap(model)
    if not inplace:
        model = copy.deepcopy(model)
    for name, layer in sparse_layers(model).items():
        dense = layer.to_dense_module()
        dense.train(layer.training)
        _set_module(model, name, dense)
    model.__dict__.pop("sparsity", None)
    return model
