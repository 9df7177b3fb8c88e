"""The one place where fxmem reaches torch internals.

fxmem works below torch's public API: it traces with ``make_fx`` on fake tensors, splits joint
graphs with AOTAutograd's partitioner, replays random ops with PyTorch's RNG higher-order ops,
models what TorchInductor materialises from Inductor's own lowering tables and config, and plugs
into Inductor through its custom-pass, choices and partitioner hooks. None of that is a stable
API, so every such name is resolved here, and nowhere else (``tests/graph/test_torch_compat.py``
checks both that each resolves and that no other module imports a private torch namespace).
When a torch release moves or renames one, fxmem breaks in this file, with a
:class:`~fxmem.errors.TorchCompatError` that names the internal and the installed torch version.

Each internal is an :class:`Internal`: a callable that imports its module on first use and
caches what it finds (so ``import fxmem`` imports nothing it did not before: Inductor and
TorchDynamo stay unimported until a caller asks for them). ``OP_OVERLOAD()`` is
``torch._ops.OpOverload``; :data:`INTERNALS` lists every one by name. Where torch has a public API,
fxmem uses it instead (``torch.func.functional_call``, ``Graph.output_node()``,
``torch.compiler.reset()``, ``OpOverload.overloadpacket``).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import types
from collections.abc import Callable
from typing import Any

import torch

from fxmem.errors import TorchCompatError

__all__ = ["INTERNALS", "Internal", "TORCH_REQUIREMENT", "TorchCompatError", "InductorThresholds",
           "inductor_thresholds", "is_op_overload", "kineto_events", "nodes_prefer_channels_last",
           "pytree", "storage_key", "one_graph_capture"]

TORCH_REQUIREMENT = "torch>=2.11"  # as pyproject.toml declares

_UNSET = object()


class Internal:
    """A torch internal: ``module`` (a dotted import path) and ``attr`` (a dotted attribute path
    in it; ``None`` for the module itself). Calling it returns the internal, imported on first
    call and cached (``cache=False``: read on every call, for config values a ``config.patch``
    may change)."""

    def __init__(self, name: str, module: str, attr: str | None, purpose: str, *,
                 cache: bool = True):
        self.name, self.module, self.attr, self.purpose, self.cache = (
            name, module, attr, purpose, cache)
        self._value: Any = _UNSET

    @property
    def path(self) -> str:
        return self.module if self.attr is None else f"{self.module}.{self.attr}"

    def __call__(self) -> Any:
        value = self._value
        if value is _UNSET:
            value = self._resolve()
            if self.cache:
                self._value = value
        return value

    def _resolve(self) -> Any:
        try:
            value = importlib.import_module(self.module)
            for part in self.attr.split(".") if self.attr else ():
                value = getattr(value, part)
        except (ImportError, AttributeError) as exc:
            raise missing(self.path, self.purpose, exc) from exc
        return value

    def __repr__(self) -> str:
        return f"Internal({self.name!r}: {self.path})"


def missing(what: str, purpose: str, exc: BaseException | None = None) -> TorchCompatError:
    """The error for a torch internal this torch does not have."""
    cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return TorchCompatError(
        f"fxmem cannot find the torch internal {what}, which it uses for {purpose}, in the "
        f"installed torch {torch.__version__}{cause}. fxmem needs {TORCH_REQUIREMENT}; if this "
        f"torch is newer, the internal has moved or been renamed, and "
        f"fxmem/graph/torch_compat.py (the one place fxmem reaches torch internals) needs "
        f"updating for it."
    )


INTERNALS: dict[str, Internal] = {}


def _internal(name: str, module: str, attr: str | None, purpose: str, *,
              cache: bool = True, register: bool = True) -> Internal:
    internal = Internal(name, module, attr, purpose, cache=cache)
    if register:
        INTERNALS[name] = internal
    return internal


# -- tracing: capture, fake tensors, ops ------------------------------------------------------

MAKE_FX = _internal("make_fx", "torch.fx.experimental.proxy_tensor", "make_fx",
                    "tracing the training step into one joint graph")
GET_PROXY_MODE = _internal("get_proxy_mode", "torch.fx.experimental.proxy_tensor",
                           "get_proxy_mode", "finding where the backward starts in the trace")
FAKE_TENSOR = _internal("FakeTensor", "torch._subclasses.fake_tensor", "FakeTensor",
                        "telling fake tensors from real ones")
FAKE_TENSOR_MODE = _internal("FakeTensorMode", "torch._subclasses.fake_tensor", "FakeTensorMode",
                             "running models on fake tensors")
DETECT_FAKE_MODE = _internal("detect_fake_mode", "torch._guards", "detect_fake_mode",
                             "finding the fake mode of a graph's values")
QUEUE_AUTOGRAD_CALLBACK = _internal(
    "queue_callback", "torch.autograd.variable", "Variable._execution_engine.queue_callback",
    "queueing a callback that runs once the backward is over (fp16 loss scaling's skip)")
AMP_UNSCALE = _internal(
    "_amp_foreach_non_finite_check_and_unscale_", "torch",
    "_amp_foreach_non_finite_check_and_unscale_",
    "unscaling gradients and flagging overflow, as torch.amp.GradScaler does")
FOREACH_NORM = _internal("_foreach_norm", "torch", "_foreach_norm",
                         "the largest magnitude of many gradients in one call (overflow check)")
UNSET_FAKE_TEMPORARILY = _internal(
    "unset_fake_temporarily", "torch._subclasses.fake_tensor", "unset_fake_temporarily",
    "running an op on real tensors while planning inside a compile (measuring its scratch)")
OP_OVERLOAD = _internal("OpOverload", "torch._ops", "OpOverload",
                        "telling ATen ops from other graph targets")
_PYTREE_FUNCTIONS = ("tree_flatten", "tree_unflatten", "tree_leaves", "tree_map",
                     "tree_flatten_with_path")
for _name in _PYTREE_FUNCTIONS:
    _internal(f"pytree.{_name}", "torch.utils._pytree", _name,
              "flattening nested inputs and outputs (torch has no public pytree module)")
del _name

# -- TorchDynamo, AOTAutograd, FX ---------------------------------------------------------------

DYNAMO_EXPLAIN = _internal("dynamo.explain", "torch._dynamo", "explain",
                           "naming the graph breaks of a step that is not one graph")
DYNAMO_UNSUPPORTED = _internal("dynamo.Unsupported", "torch._dynamo.exc", "Unsupported",
                               "reporting a graph break in fxmem.optimize")
DYNAMO_BACKEND_COMPILER_FAILED = _internal(
    "dynamo.BackendCompilerFailed", "torch._dynamo.exc", "BackendCompilerFailed",
    "unwrapping fxmem's own errors raised inside torch.compile")
AOT_AUTOGRAD = _internal("aot_autograd", "torch._dynamo.backends.common", "aot_autograd",
                         "the eager lowering of the fxmem backend")
DYNAMO_CONFIG = _internal("dynamo.config", "torch._dynamo", "config",
                          "letting one-graph capture drop the model's logging calls")
ENTER_AUTOCAST = _internal("amp._enter_autocast", "torch.amp.autocast_mode", "_enter_autocast",
                           "marking a Dynamo graph an autocast region (precision via the backend)")
EXIT_AUTOCAST = _internal("amp._exit_autocast", "torch.amp.autocast_mode", "_exit_autocast",
                          "marking a Dynamo graph an autocast region (precision via the backend)")
FUNCTORCH_CONFIG = _internal("functorch.config", "torch._functorch", "config",
                             "turning off AOTAutograd's cache (the plan must be made)")
EXTRACT_FWD_BWD_MODULES = _internal(
    "extract_fwd_bwd_modules", "torch._functorch.partitioners", "_extract_fwd_bwd_modules",
    "splitting a joint graph into forward and backward graphs")
RUN_AND_SAVE_RNG_STATE = _internal("run_and_save_rng_state", "torch._prims.rng_prims",
                                   "run_and_save_rng_state", "replaying recomputed random ops")
RUN_WITH_RNG_STATE = _internal("run_with_rng_state", "torch._prims.rng_prims",
                               "run_with_rng_state", "replaying recomputed random ops")
COMPILE_SESSION_CONTEXT = _internal(
    "compile_session_context", "torch.compiler", "_compile_session_context",
    "running model code down the path torch.compile traces (torch.compiler.is_compiling() True)")
BOXED_CODEGEN = _internal("BoxedCodeGen", "torch.fx.graph", "_BoxedCodeGen",
                          "running graphs as FX code that frees inputs after their last use")

# -- TorchInductor --------------------------------------------------------------------------------

COMPILE_FX = _internal("compile_fx", "torch._inductor.compile_fx", "compile_fx",
                       "lowering planned graphs through Inductor")
COMPILE_FX_INNER = _internal("compile_fx_inner", "torch._inductor.compile_fx", "compile_fx_inner",
                             "lowering planned graphs through Inductor")
CUSTOM_PARTITIONER_FN = _internal("CustomPartitionerFn", "torch._inductor.custom_graph_pass",
                                  "CustomPartitionerFn", "installing fxmem's planner in Inductor")
CUSTOM_GRAPH_PASS = _internal("CustomGraphPass", "torch._inductor.custom_graph_pass",
                              "CustomGraphPass", "the post-grad pass that splits delayed addmm")
INDUCTOR_CHOICES = _internal("InductorChoices", "torch._inductor.choices", "InductorChoices",
                             "keeping recomputed ops where the plan put them")
VIRTUALIZED_V = _internal("V", "torch._inductor.virtualized", "V",
                          "installing fxmem's Inductor choices handler")
INDUCTOR_CONFIG = _internal("inductor.config", "torch._inductor", "config",
                            "Inductor's settings")
LOWERINGS = _internal("lowering.lowerings", "torch._inductor.lowering", "lowerings",
                      "the memory model of Inductor (which ops it lowers to loop bodies)")
FALLBACKS = _internal("lowering.fallbacks", "torch._inductor.lowering", "fallbacks",
                      "the memory model of Inductor (which ops are fallback kernels)")
MAKE_FALLBACK = _internal(
    "make_fallback", "torch._inductor.lowering", "make_fallback",
    "registering custom ops' fallbacks before Inductor lowers a graph (process-independent "
    "lowering)")
TAG_TO_LAYOUT_CONSTRAINT = _internal(
    "tag_to_layout_constraint", "torch._inductor.lowering", "tag_to_layout_constraint",
    "registering custom ops' fallbacks with the layout constraint Inductor gives them")
GET_LAYOUT_CONSTRAINT_TAG = _internal(
    "get_layout_constraint_tag", "torch._library.utils", "get_layout_constraint_tag",
    "registering custom ops' fallbacks with the layout constraint Inductor gives them")
IS_BUILTIN = _internal("is_builtin", "torch._library.utils", "is_builtin",
                       "telling custom ops from PyTorch's own")
NEEDS_REALIZED_INPUTS = _internal(
    "lowering.needs_realized_inputs", "torch._inductor.lowering", "needs_realized_inputs",
    "the memory model of Inductor (which ops read materialised inputs)")
DECIDE_LAYOUT_OPT = _internal(
    "GraphLowering.decide_layout_opt", "torch._inductor.graph", "GraphLowering.decide_layout_opt",
    "the memory model of Inductor (whether convolutions run channels-last)")
FIND_NODES_PREFER_CHANNELS_LAST = _internal(
    "GraphLowering.find_nodes_prefer_channels_last", "torch._inductor.graph",
    "GraphLowering.find_nodes_prefer_channels_last",
    "the memory model of Inductor (which values stay contiguous)")
# Inductor's thresholds for realising a loop body (torch/_inductor/ir.py), read on every use:
# a config.patch changes them. The cpu / *_default values are read only where Inductor reads them
# (the threshold itself unset), so they are not in INTERNALS: a torch whose thresholds are plain
# ints need not have them. inductor_thresholds() reaches whichever this torch needs.
_THRESHOLDS = {name: _internal(f"inductor.config.{name}", "torch._inductor.config", name,
                               "the memory model of Inductor (when it realises a loop body)",
                               cache=False, register=not name.startswith(("_", "realize_cpu")))
               for name in ("realize_reads_threshold", "realize_acc_reads_threshold",
                            "realize_cpu_acc_reads_threshold", "_realize_acc_reads_threshold_default",
                            "realize_opcount_threshold", "realize_cpu_opcount_threshold",
                            "_realize_opcount_threshold_default")}

# -- memory: storages, optimizers, the profiler ---------------------------------------------------

STORAGE_WEAK_REF = _internal("StorageWeakRef", "torch.multiprocessing.reductions",
                             "StorageWeakRef", "identifying storages shared by views")
FOREACH_SUPPORTED_DEVICES = _internal(
    "foreach_kernels_supported_devices", "torch.utils._foreach_utils",
    "_get_foreach_kernels_supported_devices", "the memory of optimizers' foreach kernels")
FOREACH_SUPPORTED_TYPES = _internal(
    "foreach_supported_types", "torch.optim.optimizer", "_foreach_supported_types",
    "the memory of optimizers' foreach kernels")
GROUP_TENSORS_BY_DEVICE_AND_DTYPE = _internal(
    "group_tensors_by_device_and_dtype", "torch._C", "_group_tensors_by_device_and_dtype",
    "the order of Adam's foreach groups")


# -- helpers over the internals --------------------------------------------------------------------


def is_op_overload(target: object) -> bool:
    """Whether an FX node's target is an ATen (or custom) op overload, ``torch.ops.aten.x.y``."""
    return isinstance(target, OP_OVERLOAD())


def register_custom_fallbacks(gm: torch.fx.GraphModule) -> tuple:
    """Registers Inductor's fallback for each custom op of ``gm`` that Inductor has no lowering
    for yet, as Inductor itself does when it lowers the op's first node (``GraphLowering.
    call_function``'s implicit fallback, with the layout constraint of the op's tag); returns the
    ops registered.

    Registered before ``gm`` is lowered, so that Inductor lowers it the same in every process: a
    fallback registered marks its op as one that needs realised inputs, and Inductor realises a
    value read by two or more such ops once (``realize_hint``) -- where the op is not registered
    yet (the first graph of a process to read it), each of its nodes copies the value instead
    (``require_strides`` of a loop body). Without Inductor's implicit fallbacks
    (``config.implicit_fallbacks`` off) nothing is registered: Inductor then rejects the op."""
    if not INDUCTOR_CONFIG().implicit_fallbacks:
        return ()
    lowerings, builtin = LOWERINGS(), IS_BUILTIN()
    made = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and is_op_overload(target) and not builtin(target) \
                and target not in lowerings and target not in made:
            tag = GET_LAYOUT_CONSTRAINT_TAG()(target, with_default=True)
            MAKE_FALLBACK()(target, layout_constraint=TAG_TO_LAYOUT_CONSTRAINT()(tag))
            made.append(target)
    return tuple(made)


def storage_key(storage: torch.UntypedStorage) -> Any:
    """A hashable key of a storage, equal for every tensor that views it, that does not keep it
    alive (``StorageWeakRef``)."""
    return STORAGE_WEAK_REF()(storage)


class _Pytree:
    """``torch.utils._pytree``'s functions fxmem uses, each resolved through :data:`INTERNALS`
    (``from fxmem.graph.torch_compat import pytree``; ``pytree.tree_flatten(...)``)."""

    def __getattr__(self, name: str) -> Callable:
        internal = INTERNALS.get(f"pytree.{name}")
        if internal is None:
            raise AttributeError(f"fxmem.graph.torch_compat.pytree has no {name!r}: add it to "
                                 f"_PYTREE_FUNCTIONS")
        return internal()


pytree = _Pytree()


@dataclasses.dataclass(frozen=True)
class InductorThresholds:
    """When Inductor realises a loop body into a buffer (``torch/_inductor/ir.py``)."""

    reuse_reads: int  # realize_reads_threshold: reused by several consumers, reads more buffers
    max_reads: int  # has_exceeded_max_reads: a body reading more buffers is realised
    max_ops: int  # has_large_inner_fn: a reused body of more ops is realised


def inductor_thresholds(device_type: str) -> InductorThresholds:
    """Inductor's realisation thresholds for a graph on ``device_type``, read from
    ``torch._inductor.config`` now, and resolved as Inductor resolves them (an unset
    ``realize_acc_reads_threshold`` / ``realize_opcount_threshold`` means the CPU's own value on
    the CPU, the default elsewhere)."""

    cpu = device_type == "cpu"

    def value(name: str, cpu_name: str | None = None, default_name: str | None = None) -> int:
        v = _THRESHOLDS[name]()
        if v is None and cpu_name is not None and default_name is not None:
            v = _THRESHOLDS[cpu_name if cpu else default_name]()
        if not isinstance(v, int):
            raise missing(f"torch._inductor.config.{name}", "the memory model of Inductor",
                          TypeError(f"expected an int, got {v!r}"))
        return v

    return InductorThresholds(
        reuse_reads=value("realize_reads_threshold"),
        max_reads=value("realize_acc_reads_threshold", "realize_cpu_acc_reads_threshold",
                        "_realize_acc_reads_threshold_default"),
        max_ops=value("realize_opcount_threshold", "realize_cpu_opcount_threshold",
                      "_realize_opcount_threshold_default"))


def nodes_prefer_channels_last(gm: torch.fx.GraphModule) -> Any:
    """The nodes of ``gm`` that Inductor's layout optimisation makes channels-last.

    ``GraphLowering.find_nodes_prefer_channels_last`` is an instance method, but it reads only
    ``self.module`` (the graph). Building a real ``GraphLowering`` would need a compile context
    (fake mode, shape env, virtualized handlers), so it is called with a stand-in ``self`` that has
    just ``module``; if a torch release makes it read more, the call fails and the caller falls
    back to assuming every value channels-last (the side of more memory)."""
    find = FIND_NODES_PREFER_CHANNELS_LAST()
    return find(types.SimpleNamespace(module=gm))


def kineto_events(prof: Any) -> list:
    """The events of a finished ``torch.profiler.profile`` (``prof.profiler.kineto_results``:
    the allocation events, ``[memory]``, are not in the public ``prof.events()``)."""
    try:
        results = prof.profiler.kineto_results
    except AttributeError as exc:
        raise missing("torch.profiler.profile().profiler.kineto_results",
                      "reading the profiler's allocation events", exc) from exc
    return list(results.events())


def one_graph_capture():
    """The TorchDynamo settings under which fxmem.optimize captures a step as one graph:

    - calls to ``logging.Logger`` methods are dropped instead of breaking the graph (as
      ``torch.export`` does): Hugging Face models log warnings (``logger.warning_once``) from
      inside ``forward`` on their first call. The methods are read when the context opens, so
      methods libraries add to ``Logger`` (transformers' ``warning_once``) are included;
      messages logged from the compiled graph are not emitted.
    - Dynamo's DDP optimizer is off: under ``DistributedDataParallel`` it would split the step
      into one graph per gradient bucket, each compiled on its own; fxmem plans the step as one
      (DDP's hooks still reduce the gradients, once the compiled backward has made them)."""
    methods = {value for name, value in vars(logging.Logger).items()
               if callable(value) and not name.startswith("_")}
    config = DYNAMO_CONFIG()
    return config.patch(ignore_logging_functions=set(config.ignore_logging_functions) | methods,
                        optimize_ddp=False)
