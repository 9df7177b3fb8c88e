"""fxmem reaches torch internals only through fxmem.graph.torch_compat, and each one resolves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fxmem.errors import FxmemError, TorchCompatError
from fxmem.graph import torch_compat

PACKAGE = Path(torch_compat.__file__).resolve().parents[1]
COMPAT = Path(torch_compat.__file__).resolve()


@pytest.mark.parametrize("name", sorted(torch_compat.INTERNALS))
def test_each_internal_resolves_through_the_compat_module(name):
    internal = torch_compat.INTERNALS[name]
    value = internal()
    if name.startswith("inductor.config."):  # a config value: an int, or None for "per device"
        assert value is None or isinstance(value, int)
    elif name.startswith("lowering."):  # Inductor's lowering tables
        assert hasattr(value, "__contains__")
    elif name == "foreach_supported_types":
        assert all(isinstance(t, type) for t in value)
    else:
        assert callable(value) or isinstance(value, type) or hasattr(value, "__dict__"), value
    assert internal() is value or not internal.cache  # cached: resolved once


def test_helpers_resolve_what_they_need():
    assert torch_compat.is_op_overload(torch.ops.aten.add.Tensor)
    assert not torch_compat.is_op_overload(torch.ops.aten.add)  # the packet, not an overload
    assert not torch_compat.is_op_overload(len)
    x = torch.zeros(4)
    assert torch_compat.storage_key(x.untyped_storage()) == torch_compat.storage_key(
        x[1:].untyped_storage())
    leaves, spec = torch_compat.pytree.tree_flatten(({"a": x}, [1, x]))
    assert torch_compat.pytree.tree_unflatten(leaves, spec)[1][0] == 1
    with pytest.raises(AttributeError, match="_PYTREE_FUNCTIONS"):
        torch_compat.pytree.tree_no_such_function
    for device in ("cpu", "cuda"):
        limits = torch_compat.inductor_thresholds(device)
        assert min(limits.reuse_reads, limits.max_reads, limits.max_ops) > 0


def test_inductor_thresholds_follow_inductors_config_at_use_time():
    from torch._inductor import config

    with config.patch(realize_reads_threshold=7, realize_opcount_threshold=99,
                      realize_acc_reads_threshold=3):
        assert torch_compat.inductor_thresholds("cpu") == torch_compat.InductorThresholds(
            reuse_reads=7, max_reads=3, max_ops=99)
    assert torch_compat.inductor_thresholds("cpu").reuse_reads == config.realize_reads_threshold


def test_kineto_events_reads_the_profilers_allocation_events():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.ones(1024).sum()
    events = torch_compat.kineto_events(prof)
    assert any(e.name() == "[memory]" and e.nbytes() > 0 for e in events)


def test_a_missing_internal_is_a_clear_error(monkeypatch):
    internal = torch_compat.INTERNALS["extract_fwd_bwd_modules"]
    monkeypatch.setattr(internal, "module", "torch._functorch.no_such_partitioners")
    monkeypatch.setattr(internal, "_value", torch_compat._UNSET)
    with pytest.raises(TorchCompatError) as info:
        internal()
    message = str(info.value)
    assert "torch._functorch.no_such_partitioners._extract_fwd_bwd_modules" in message
    assert torch.__version__ in message and torch_compat.TORCH_REQUIREMENT in message
    assert "fxmem/graph/torch_compat.py" in message and internal.purpose in message
    assert isinstance(info.value, FxmemError) and isinstance(info.value, ImportError)

    renamed = torch_compat.INTERNALS["OpOverload"]
    monkeypatch.setattr(renamed, "attr", "NoSuchOpOverload")
    monkeypatch.setattr(renamed, "_value", torch_compat._UNSET)
    with pytest.raises(TorchCompatError, match=r"torch\._ops\.NoSuchOpOverload\b.*AttributeError"):
        torch_compat.is_op_overload(torch.ops.aten.add.Tensor)


def test_the_compat_module_imports_no_internal_itself():
    """The accessors are lazy: at import, torch_compat imports only torch itself (what Inductor,
    TorchDynamo... fxmem imports is up to its callers, most of them lazy)."""
    tree = ast.parse(COMPAT.read_text())
    imported = {alias.name for node in tree.body if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert {m for m in imported if m.startswith("torch")} == {"torch"}
    assert all(not isinstance(node, ast.Import | ast.ImportFrom)
               for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) for node in fn.body)


# -- no module but torch_compat reaches a private torch namespace ----------------------------------


def _private(path: str) -> bool:
    """A dotted torch path through a private or experimental namespace (ATen ops, whose names
    may start with "_", are public through ``torch.ops``)."""
    parts = path.split(".")
    if parts[0] != "torch" or parts[:2] == ["torch", "ops"]:
        return False
    return any((p.startswith("_") and not (p.startswith("__") and p.endswith("__")))
               or p == "experimental" for p in parts[1:])


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    torch_names: dict[str, str] = {}  # local name -> the torch path it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    if _private(alias.name):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    if alias.asname:
                        torch_names[alias.asname] = alias.name
                    else:
                        torch_names["torch"] = "torch"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "torch":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if _private(full):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                torch_names[alias.asname or alias.name] = full

    def torch_path(expr: ast.expr) -> str | None:
        chain = []
        while isinstance(expr, ast.Attribute):
            chain.append(expr.attr)
            expr = expr.value
        if isinstance(expr, ast.Name) and expr.id in torch_names:
            return ".".join([torch_names[expr.id], *reversed(chain)])
        return None

    for node in ast.walk(tree):
        full = None
        if isinstance(node, ast.Attribute):
            full = torch_path(node)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):  # getattr(torch.x, "_y")
            base = torch_path(node.args[0])
            full = f"{base}.{node.args[1].value}" if base else None
        if full is not None and _private(full):
            found.append(f"line {node.lineno}: {full}")
    return sorted(set(found))


def test_the_rule_finds_private_uses(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\nimport torch._dynamo\nfrom torch.utils import _pytree as pytree\n"
        "from torch import fx\nfrom torch.fx.experimental.proxy_tensor import make_fx\n"
        "x = torch._ops.OpOverload\ny = fx.graph._BoxedCodeGen\n"
        "z = getattr(torch.compiler, '_is_compiling_flag', None)\n"
        "ok = (torch.ops.aten._unsafe_view.default, torch.__version__, torch.fx.Graph)\n")
    found = "\n".join(_private_uses(sample))
    for expected in ("import torch._dynamo", "_pytree", "experimental.proxy_tensor",
                     "torch._ops.OpOverload", "torch.fx.graph._BoxedCodeGen",
                     "torch.compiler._is_compiling_flag"):
        assert expected in found
    assert "_unsafe_view" not in found and "__version__" not in found


def test_no_module_but_torch_compat_reaches_private_torch_namespaces():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.resolve() == COMPAT:
            continue
        uses = _private_uses(path)
        if uses:
            offenders[str(path.relative_to(PACKAGE.parent))] = uses
    assert not offenders, (
        "torch internals outside fxmem/graph/torch_compat.py (add an Internal there and use "
        f"it instead): {offenders}")
