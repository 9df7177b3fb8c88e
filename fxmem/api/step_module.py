"""The training step as one module for TorchDynamo to capture (``fxmem.optimize``'s).

:class:`StepModule` runs the model and its loss with flat tensor inputs and returns ``(loss,
*held outputs)``; :func:`rebuild_output` gives the user the model's output back in its own shape
(a tensor, a mapping such as a Hugging Face ``ModelOutput``, a sequence) from the recipe
``StepModule.output_layout`` found; :func:`own_code` gives each plan a code object of its own.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Mapping

import torch

from fxmem.graph import torch_compat
from fxmem.graph.capture import _check_loss, _held_tensors, loss_from_output
from fxmem.graph.compile_path import compiled_code_path
from fxmem.graph.torch_compat import pytree
from fxmem.levers.precision import ComputeCasts, run_with_casts

__all__ = ["StepModule", "rebuild_output", "own_code"]


class StepModule(torch.nn.Module):
    """The model and its loss as one module with flat tensor inputs: (loss, *held outputs).
    ``casts``: the precision lever's compute casts (the step then runs under torch.autocast), or
    None (the model's own dtypes)."""

    def __init__(self, model, loss_fn, leaves, spec, slots, casts: ComputeCasts | None = None):
        super().__init__()
        self.model = model
        self.loss_fn, self.leaves, self.spec, self.slots = loss_fn, leaves, spec, slots
        self.casts = casts

    def _output(self, tensors):
        leaves = list(self.leaves)
        for slot, t in zip(self.slots, tensors):
            leaves[slot] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        if self.loss_fn is not None:
            output = self.loss_fn(self.model, *args, **kwargs)
            _check_loss(output)
            return output, output
        output = self.model(*args, **kwargs)
        return output, loss_from_output(output)

    def forward(self, *tensors):
        if self.casts is not None:  # the precision lever: the joint graph holds autocast's casts
            return run_with_casts(self.casts, self._flat, tensors)
        output, loss = self._output(tensors)
        # other outputs are returned detached: the caller holds them, the backward ignores them
        return (loss, *(h.detach() for h in _held_tensors(output, loss)))

    def _flat(self, tensors):
        output, loss = self._output(tensors)
        return (loss, *(h.detach() for h in _held_tensors(output, loss)))

    def output_layout(self, tensors):
        """How the model's output is built, found by running it once on fake tensors."""
        from fxmem.graph.capture import _call_with_state

        FakeTensorMode = torch_compat.FAKE_TENSOR_MODE()
        state = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        with compiled_code_path(), \
                FakeTensorMode(allow_non_fake_inputs=True) as mode:  # params as fake copies: in-place
            # updates must not reach the model; closure tensors (a loss_fn's targets) are read
            fake_state = {k: mode.from_tensor(v) for k, v in state.items()}
            fakes = [mode.from_tensor(t) for t in tensors]
            output, loss = _call_with_state(self.model, fake_state, self._output, fakes)
            return _layout(output, loss, _held_tensors(output, loss))


def _layout(output, loss, held):
    """How to rebuild the model's output from (loss, *held): a small recipe, no tensors."""
    if isinstance(output, torch.Tensor):
        return ("tensor",)
    if isinstance(output, Mapping):
        keys = [k for k, v in output.items() if isinstance(v, torch.Tensor)]
        return ("mapping", type(output), keys, [output[k] is loss for k in keys])
    if isinstance(output, (tuple, list)):
        return ("sequence", type(output), [x is loss for x in output
                                           if isinstance(x, torch.Tensor)])
    return ("namespace",)


def rebuild_output(layout, loss, held):
    kind = layout[0]
    if kind == "tensor":
        return loss
    rest = iter(held)
    if kind == "mapping":
        _, cls, keys, is_loss = layout
        values = {k: (loss if flag else next(rest)) for k, flag in zip(keys, is_loss)}
        try:
            return cls(**values)
        except TypeError:
            return dict(values)
    if kind == "sequence":
        _, cls, is_loss = layout
        return cls(loss if flag else next(rest) for flag in is_loss)
    return types.SimpleNamespace(loss=loss, outputs=tuple(held))


_compiles = itertools.count()


def own_code(step: StepModule):
    """The step's forward as a function with a code object of its own. TorchDynamo caches
    compiled graphs per code object and stops recompiling one after a few guard failures; every
    plan (module, budget, input signature) is a compile of its own, not a recompile."""
    template = StepModule.forward
    code = template.__code__.replace(co_name=f"fxmem_step_{next(_compiles)}")
    function = types.FunctionType(code, template.__globals__, code.co_name)
    return types.MethodType(function, step)
