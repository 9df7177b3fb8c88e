"""Capture a training step (forward, loss, backward) as one joint ATen-level FX graph.

The step is traced with ``make_fx`` on fake tensors: the model runs through
``torch.func``-style reparametrisation with fake parameters, the loss is reduced from its output,
and ``torch.autograd.grad`` runs the autograd engine under the tracer, so the backward ops are
recorded in the order eager PyTorch runs them. No parameter or activation memory is allocated, so
a model on the ``meta`` device (bigger than the machine) can be captured.

Unlike AOTAutograd's functionalised joint graph, the captured graph keeps eager PyTorch's own
in-place ops (BatchNorm's running statistics, dropout's ``bernoulli_``) and its views, which is
what the memory model needs to predict the eager step.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx

from fxmem.errors import CaptureError, StepInputError
from fxmem.graph import torch_compat
from fxmem.graph.torch_compat import pytree
from fxmem.graph.compile_path import compiled_code_path

__all__ = ["Role", "CapturedStep", "capture_step", "loss_from_output"]

log = logging.getLogger(__name__)


class Role(str, enum.Enum):
    """What a node of the joint graph holds."""

    PARAMETER = "parameter"
    BUFFER = "buffer"
    INPUT = "input"
    ACTIVATION = "activation"  # computed by the forward
    LOSS = "loss"
    GRADIENT = "gradient"  # computed by the backward (gradients of activations and of parameters)
    TANGENT = "tangent"  # the gradient flowing into the backward (AOTAutograd joint graphs)


@dataclasses.dataclass
class CapturedStep:
    """A training step as one joint forward+backward graph, with every node labelled.

    ``gm`` takes ``(*parameters, *buffers, *input_tensors)`` as placeholders (the order of
    ``param_names``, ``buffer_names``, ``input_names``) and returns
    ``[loss, *held_outputs, *parameter_gradients]``.
    """

    gm: torch.fx.GraphModule
    roles: dict[str, Role]
    backward_nodes: frozenset[str]
    param_names: dict[str, str]  # placeholder node name -> parameter qualified name
    buffer_names: dict[str, str]  # placeholder node name -> buffer qualified name
    input_names: dict[str, str]  # placeholder node name -> input path, e.g. "args[0]", "kwargs['labels']"
    loss_node: str
    held_outputs: list[str]  # model outputs the caller holds until the step ends (e.g. HF logits)
    grad_of: dict[str, str]  # node producing a parameter's gradient -> parameter qualified name
    device: torch.device

    def is_backward(self, node: torch.fx.Node | str) -> bool:
        return (node if isinstance(node, str) else node.name) in self.backward_nodes

    @property
    def num_forward_ops(self) -> int:
        return sum(
            1
            for n in self.gm.graph.nodes
            if n.op == "call_function" and n.name not in self.backward_nodes
        )

    @property
    def num_backward_ops(self) -> int:
        return len(self.backward_nodes)


def loss_from_output(output: Any) -> torch.Tensor:
    """The loss in a model's output: a scalar tensor, ``.loss`` (Hugging Face), a ``"loss"`` key,
    or the first element of a tuple when that is a scalar tensor."""
    if isinstance(output, torch.Tensor):
        loss = output
    elif isinstance(output, Mapping) and "loss" in output:
        loss = output["loss"]
    elif not isinstance(output, Mapping) and getattr(output, "loss", None) is not None:
        loss = output.loss
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor) \
            and output[0].dim() == 0:
        loss = output[0]
    else:
        raise StepInputError(
            f"the model's output ({_describe(output)}) has no loss: return a scalar tensor, an "
            "object with a .loss (Hugging Face outputs: pass labels), a dict with a 'loss' key, "
            "or pass loss_fn=lambda model, *args, **kwargs: <scalar loss>"
        )
    _check_loss(loss)
    return loss


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise StepInputError(f"the loss must be a tensor, got {_describe(loss)}")
    if loss.dim() != 0:
        raise StepInputError(
            f"the loss must be a scalar tensor, got shape {tuple(loss.shape)}: reduce it "
            "(e.g. .mean() or .sum()) or pass a loss_fn that does"
        )
    if not loss.dtype.is_floating_point:
        raise StepInputError(f"the loss must be floating point, got {loss.dtype}")
    if not loss.requires_grad:
        raise StepInputError(
            "the loss does not require grad: no trainable parameter reaches it (are all parameters "
            "frozen, or is the step running under torch.no_grad()?)"
        )


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    if isinstance(x, Mapping):
        return f"{type(x).__name__} with keys {list(x.keys())}"
    return type(x).__name__


def _held_tensors(output: Any, loss: torch.Tensor) -> list[torch.Tensor]:
    """Tensors in a model's output other than the loss: the caller holds them until the step ends."""
    found: list[torch.Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            if x is not loss:
                found.append(x)
        elif isinstance(x, Mapping):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name))

    walk(output)
    return found


def _model_device(model: torch.nn.Module) -> torch.device:
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if not devices:
        raise StepInputError("the model has no parameters or buffers: there is nothing to train")
    if len(devices) > 1:
        raise StepInputError(
            f"the model's parameters and buffers are on several devices {sorted(map(str, devices))}; "
            "fxmem plans a step on one device: move the model with model.to(device)"
        )
    return devices.pop()


class _Calling(torch.nn.Module):
    """A module whose forward is ``fn``, holding ``model`` (for :func:`_call_with_state`)."""

    def __init__(self, model: torch.nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self.__dict__["fn"] = fn  # not a submodule even if a module (the model itself): its
        # parameters are the model's, under ``model.``

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _call_with_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], fn: Callable,
                     *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` with ``model``'s parameters and buffers replaced by ``state`` (by
    qualified name; tied weights stay tied): ``torch.func.functional_call`` on a module that holds
    ``model`` and whose forward is ``fn`` (a loss function calls the model itself)."""
    return torch.func.functional_call(_Calling(model, fn),
                                      {f"model.{k}": v for k, v in state.items()},
                                      args, kwargs, tie_weights=True)


def _input_paths(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    paths = []
    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    for keypath, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            head, *rest = keypath
            name = ("args" if head.idx == 0 else "kwargs") + "".join(str(k) for k in rest)
            paths.append((name, leaf))
    return paths


def _checked_step_inputs(
    model: Any, args: Any, kwargs: dict | None
) -> tuple[tuple, dict, torch.device, list[tuple[str, torch.Tensor]]]:
    """The step's ``args`` (a tuple: a single argument is wrapped), ``kwargs`` (a dict), the
    model's device and the input tensors by path; :class:`StepInputError` unless ``model`` is a
    module on one device and every input tensor is on that device."""
    kwargs = dict(kwargs or {})
    if not isinstance(model, torch.nn.Module):
        raise StepInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    device = _model_device(model)
    inputs = _input_paths(args, kwargs)
    for name, t in inputs:
        if t.device != device:
            raise StepInputError(
                f"input {name} is on {t.device} but the model is on {device}: move the inputs to "
                f"the model's device (e.g. x.to('{device}'))"
            )
    return args, kwargs, device, inputs


def _trainable_names(params: Mapping[str, torch.nn.Parameter]) -> list[str]:
    """The names of the parameters that require grad; :class:`StepInputError` if there is none."""
    trainable = [n for n, p in params.items() if p.requires_grad]
    if not trainable:
        raise StepInputError("the model has no parameter with requires_grad=True: nothing to train")
    return trainable


def capture_step(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
) -> CapturedStep:
    """Trace ``loss = loss_of(model(*args, **kwargs)); loss.backward()`` into one joint graph.

    ``loss_fn(model, *args, **kwargs)``, when given, replaces the model call and returns the loss.
    Raises :class:`StepInputError` for a step that cannot train (no loss, non-scalar loss, inputs on
    another device) and :class:`CaptureError`, naming the graph breaks, for a model that cannot be
    traced as one graph.
    """
    args, kwargs, device, inputs = _checked_step_inputs(model, args, kwargs)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    trainable = _trainable_names(params)

    flat_leaves, in_spec = pytree.tree_flatten((args, kwargs))
    tensor_slots = [i for i, leaf in enumerate(flat_leaves) if isinstance(leaf, torch.Tensor)]
    layout: dict[str, Any] = {}

    def joint(param_list, buffer_list, input_list):
        leaves = list(flat_leaves)
        for slot, t in zip(tensor_slots, input_list):
            leaves[slot] = t
        call_args, call_kwargs = pytree.tree_unflatten(leaves, in_spec)
        mapping = {**dict(zip(params, param_list)), **dict(zip(buffers, buffer_list))}
        if loss_fn is not None:
            output = _call_with_state(model, mapping, loss_fn, model, *call_args, **call_kwargs)
            loss = output
            _check_loss(loss)
        else:
            output = _call_with_state(model, mapping, model, *call_args, **call_kwargs)
            loss = loss_from_output(output)
        held = [t.detach() for t in _held_tensors(output, loss)]
        layout["backward_start"] = len(torch_compat.GET_PROXY_MODE()().tracer.graph.nodes)
        diff = [mapping[n] for n in trainable]
        grads = torch.autograd.grad(loss, diff, allow_unused=True)
        layout["num_held"] = len(held)
        layout["grad_params"] = [n for n, g in zip(trainable, grads) if g is not None]
        return [loss, *held, *(g for g in grads if g is not None)]

    input_tensors = [t for _, t in inputs]
    make_fx = torch_compat.MAKE_FX()  # outside the try: a torch without it is not a graph break
    try:
        with torch.enable_grad(), compiled_code_path():  # the code the compiled step runs
            # stack traces: reports (e.g. ops that mix samples across the batch) name user lines
            gm = make_fx(joint, tracing_mode="fake", _allow_non_fake_inputs=True,
                         record_stack_traces=True)(
                list(params.values()), list(buffers.values()), input_tensors
            )
    except StepInputError:
        raise
    except Exception as exc:  # the tracer's failures are many; all mean "not one graph"
        raise _capture_failure(exc, model, args, kwargs, loss_fn, device) from exc

    return _label(gm, layout, list(params), list(buffers), [n for n, _ in inputs], device)


def _label(gm, layout, param_names, buffer_names, input_names, device) -> CapturedStep:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    n_p, n_b = len(param_names), len(buffer_names)
    roles: dict[str, Role] = {}
    pmap, bmap, imap = {}, {}, {}
    for i, node in enumerate(placeholders):
        if i < n_p:
            roles[node.name], pmap[node.name] = Role.PARAMETER, param_names[i]
        elif i < n_p + n_b:
            roles[node.name], bmap[node.name] = Role.BUFFER, buffer_names[i - n_p]
        else:
            roles[node.name], imap[node.name] = Role.INPUT, input_names[i - n_p - n_b]

    start = layout["backward_start"]
    backward = set()
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "get_attr":
            roles[node.name] = Role.BUFFER  # a tensor constant the model holds
        elif node.op == "call_function":
            if i >= start:
                backward.add(node.name)
                roles[node.name] = Role.GRADIENT
            else:
                roles[node.name] = Role.ACTIVATION

    output_node = gm.graph.output_node()
    outs = list(output_node.args[0])
    loss, held = outs[0], outs[1 : 1 + layout["num_held"]]
    grads = outs[1 + layout["num_held"] :]
    roles[loss.name] = Role.LOSS
    grad_of = {g.name: p for g, p in zip(grads, layout["grad_params"])}
    log.debug(
        "captured step: %d nodes, %d backward, %d parameter gradients",
        len(gm.graph.nodes), len(backward), len(grad_of),
    )
    return CapturedStep(
        gm=gm,
        roles=roles,
        backward_nodes=frozenset(backward),
        param_names=pmap,
        buffer_names=bmap,
        input_names=imap,
        loss_node=loss.name,
        held_outputs=[h.name for h in held],
        grad_of=grad_of,
        device=device,
    )


def _capture_failure(exc, model, args, kwargs, loss_fn, device) -> CaptureError:
    """Explain why a step is not one graph: run TorchDynamo's explain to name every break."""
    breaks: list[tuple[str, str]] = []
    if device.type != "meta":
        breaks = _graph_breaks(model, args, kwargs, loss_fn)
    lines = [f"cannot capture the training step as one graph: {type(exc).__name__}: {exc}".rstrip()]
    if breaks:
        lines.append(f"TorchDynamo finds {len(breaks)} graph break(s):")
        lines += [f"  - {reason} at {where}" for reason, where in breaks]
    lines.append(
        "fxmem.optimize needs the step as one graph: remove data-dependent Python control flow "
        "(if/while on tensor values), .item()/.tolist()/.numpy() calls and prints of tensors; "
        "or keep the breaks and compile the model with the fxmem backend, "
        "torch.compile(model, backend='fxmem', options={'budget': ...}), which plans the graphs "
        "between the breaks under one shared budget (recompute and precision; for the sparse "
        "lever sparsify the model first with fxmem.sparsify)"
    )
    return CaptureError("\n".join(lines), breaks)


def _graph_breaks(model, args, kwargs, loss_fn) -> list[tuple[str, str]]:
    """Graph breaks by TorchDynamo, run on the real inputs without autograd; model state restored."""
    explain = torch_compat.DYNAMO_EXPLAIN()

    def forward(*a, **k):
        return loss_fn(model, *a, **k) if loss_fn is not None else model(*a, **k)

    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    rng = torch.random.get_rng_state()
    try:
        with torch.no_grad():
            explained = explain(forward)(*args, **kwargs)
    except Exception as exc:  # explain itself failed: report the original error only
        log.debug("TorchDynamo's explain failed: %s", exc)
        return []
    finally:
        torch.random.set_rng_state(rng)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved_buffers[n])
        torch.compiler.reset()
    breaks = []
    for reason in explained.break_reasons:
        frame = next(
            (f for f in reversed(reason.user_stack) if "torch/" not in f.filename.replace("\\", "/")),
            reason.user_stack[-1] if reason.user_stack else None,
        )
        where = f"{frame.filename}:{frame.lineno} ({frame.line})" if frame else "unknown location"
        breaks.append((reason.reason.strip().splitlines()[0], where))
    return breaks
