"""A module that stands for the model it wraps: the same forward signature, parameters, buffers,
submodules, state_dict keys and attributes.

:class:`ModelProxy` is the base of :class:`fxmem.OptimizedModule`. The wrapper does not hold the
model as a submodule (which would prefix every key with the attribute's name, as
``torch.compile``'s ``_orig_mod.`` does): it shares the model's own tables of parameters,
buffers and submodules, so ``named_parameters()``, ``state_dict()``, ``load_state_dict()``,
``modules()`` and ``named_children()`` give the model's names and the very same Parameter
objects, and a wrapper nested in another module saves and loads under the parent's prefix alone.
The model is ``proxy.module`` (the name ``DistributedDataParallel`` uses, which
``transformers.modeling_utils.unwrap_model`` follows when Accelerate is absent).

- ``inspect.signature(proxy.forward)`` is the model's (an instance attribute, as
  ``torch.compile``'s wrapper sets it): the Hugging Face ``Trainer`` keeps the dataset columns
  the model takes.
- Attributes the wrapper lacks come from the model: ``config``, ``generation_config``,
  ``save_pretrained``, ``can_generate``, ``main_input_name``, ``gradient_checkpointing_enable``...
- ``train()``/``eval()``, ``to()``/``cuda()``/``float()`` (``_apply``), ``apply()`` and
  ``state_dict()``/``load_state_dict()`` run the model's own methods (its hooks and overrides
  included).
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

__all__ = ["ModelProxy", "unwrap"]

log = logging.getLogger(__name__)

# the tables nn.Module keeps a module's structure in; the proxy shares the model's
_SHARED_TABLES = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")


class ModelProxy(torch.nn.Module):
    """Stands for ``model``: subclasses define ``forward`` (whose calls keep the model's
    signature) and keep their own state in plain attributes."""

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__()
        self.__dict__["module"] = model  # not a submodule: no "module." prefix on keys
        for table in _SHARED_TABLES:
            self.__dict__[table] = model.__dict__[table]
        self.training = model.training
        forward = functools.partial(type(self).forward, self)
        functools.update_wrapper(forward, model.forward)
        forward.__signature__ = _signature_of(model.forward)
        self.__dict__["forward"] = forward

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # the shared parameters, buffers, submodules
        except AttributeError:
            model = self.__dict__.get("module")
            if model is None or name in _SHARED_TABLES or name == "module":
                raise
        return getattr(model, name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self.__dict__["module"])))

    def state_dict(self, *args, **kwargs):
        """The model's own ``state_dict`` (its keys, its hooks)."""
        return self.__dict__["module"].state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The model's own ``load_state_dict``: keys as the model's ``state_dict`` gives them."""
        return self.__dict__["module"].load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True):
        self.__dict__["module"].train(mode)
        self.training = mode
        return self

    def _apply(self, fn, recurse: bool = True):
        self.__dict__["module"]._apply(fn, recurse)
        return self

    def apply(self, fn):
        """``fn`` on the model and every submodule, as ``model.apply(fn)``."""
        self.__dict__["module"].apply(fn)
        return self

    def extra_repr(self) -> str:
        return f"module={type(self.__dict__['module']).__name__}"


def _signature_of(forward) -> inspect.Signature | None:
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):  # a builtin or C callable: keep the generic one
        log.debug("no signature for %r", forward)
        return None


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a :class:`ModelProxy` (an :class:`fxmem.OptimizedModule`), or
    ``module`` itself."""
    while isinstance(module, ModelProxy):
        module = module.__dict__["module"]
    return module
