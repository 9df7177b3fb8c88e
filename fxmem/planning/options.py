"""What the user asked of a plan (:class:`PlanOptions`, frozen) and what fxmem derived from the
step beyond its graph (:class:`StepContext`, frozen): two things, kept apart.

A lever that holds bytes outside the planned graph (an optimizer's state, a microbatched step's
gradient buffers) says so by adding to the context, never by adding a field to the options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch

from fxmem.cost.model import DeviceSpec
from fxmem.memory.simulation import Category

__all__ = ["PlanOptions", "StepContext", "LEVERS", "EXACT_LEVERS", "STRATEGIES", "LOWERINGS",
           "default_margin", "OPTIMIZER_STEP"]

LEVERS = ("recompute", "microbatch", "precision", "sparse")
EXACT_LEVERS = ("recompute", "microbatch")  # allowed by default: gradients equal eager's
STRATEGIES = ("ilp", "greedy", "checkpoint-blocks", "save-all")
LOWERINGS = ("eager", "inductor")  # how a plan's graphs run: FX code, or Inductor's kernels
OPTIMIZER_STEP = "optimizer.step"  # the point after the backward where the optimizer runs


def default_margin(lowering: str, device: torch.device | str) -> float:
    """The planning margin (a fraction of the budget) when the user gives none: 1%, and 3% for
    Inductor off the CPU. On the CPU, with Inductor's channels-last copies, buffer pool and the C++
    backend's kernel groups modelled, measured peaks equal the model's to 0.1 MiB or fall under
    it on the three bench workloads (bench/results/recompute_peers.md); Triton's buffers have not
    been measured against the model, so it keeps a wider margin."""
    if lowering == "inductor" and torch.device(device).type != "cpu":
        return 0.03
    return 0.01


def check_allow(allow: Iterable[str] | str) -> frozenset[str]:
    """``allow`` as a set of lever names; a ValueError naming the levers for an unknown one."""
    allow = frozenset([allow] if isinstance(allow, str) else allow)
    unknown = allow - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown levers {sorted(unknown)}; the levers are {list(LEVERS)}")
    return allow


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """How the user asked to plan: the budget (bytes), the levers a plan may use, the solver
    strategy and its limits, how the graphs run (``lowering``), the planning margin (``None``:
    :func:`default_margin` once the step's device is known), how ops are priced (``cost``:
    "roofline", or "profile" to time them on the device) and the device's roofline
    (``device_spec``; ``None``: the step's device's)."""

    budget: int
    allow: frozenset[str] = frozenset({"recompute"})
    strategy: str = "ilp"
    lowering: str = "eager"
    time_limit: float = 30.0
    gap: float = 0.02
    safety_margin: float | None = 0.0
    cost: str = "roofline"
    max_rounds: int = 6
    device_spec: DeviceSpec | None = None
    # with the precision lever: the dtype the solver may store saved fp32 values in (None: not)
    store_low: torch.dtype | None = None
    # where saved values may be stored low: in 8 bits too (blockwise int8, the solver's choice
    # per value; fxmem.optimize(stored_bits=8))
    store_8bit: bool = False

    def __post_init__(self):
        object.__setattr__(self, "allow", check_allow(self.allow))
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"budget must be a positive number of bytes, got {self.budget!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if self.safety_margin is not None and not 0.0 <= self.safety_margin < 0.5:
            raise ValueError("safety_margin must be in [0, 0.5)")
        if self.lowering not in LOWERINGS:
            raise ValueError(f"lowering must be one of {LOWERINGS}, got {self.lowering!r}")
        if self.cost not in ("roofline", "profile"):
            raise ValueError(f"cost must be 'roofline' or 'profile', got {self.cost!r}")
        if self.store_low is not None and self.store_low not in (torch.bfloat16, torch.float16):
            raise ValueError(f"store_low must be torch.bfloat16, torch.float16 or None, got "
                             f"{self.store_low!r}")
        if not isinstance(self.store_8bit, bool):
            raise TypeError(f"store_8bit must be a bool, got {type(self.store_8bit).__name__}")
        if self.time_limit <= 0:
            raise ValueError(f"time_limit must be positive seconds, got {self.time_limit!r}")

    def margin_for(self, device: torch.device | str) -> float:
        """The planning margin on ``device``: the user's, or :func:`default_margin`."""
        if self.safety_margin is not None:
            return self.safety_margin
        return default_margin(self.lowering, device)

    def limit_for(self, device: torch.device | str) -> int:
        """The most bytes a plan's simulated peak may reach: the budget less the margin."""
        return int(self.budget * (1.0 - self.margin_for(device)))


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What the step holds beyond its graph's own tensors, derived by fxmem: ``resident`` bytes
    by category held throughout (optimizer state; a microbatched step's gradient buffers and the
    rest of the whole batch's inputs and outputs), and ``epilogue`` points after the backward,
    each with the temporaries it allocates (the optimizer's step)."""

    resident: tuple[tuple[str, int], ...] = ()
    epilogue: tuple[tuple[str, int], ...] = ()
    during_backward: tuple[tuple[str, int], ...] = ()  # held from the backward's start on

    @classmethod
    def of_optimizer(cls, state_bytes: int, step_bytes: int) -> "StepContext":
        """The context an optimizer makes: its state held throughout, its step's temporaries."""
        return cls(resident=((Category.OPTIMIZER_STATE, int(state_bytes)),) if state_bytes else (),
                   epilogue=((OPTIMIZER_STEP, int(step_bytes)),) if step_bytes else ())

    def plus(self, resident: Mapping[str, int],
             during_backward: Mapping[str, int] | None = None) -> "StepContext":
        """This context with more bytes (by category) held throughout, and from the backward's
        start on."""
        return dataclasses.replace(
            self, resident=self.resident + tuple((c, int(b)) for c, b in resident.items() if b),
            during_backward=self.during_backward + tuple(
                (c, int(b)) for c, b in (during_backward or {}).items() if b))

    @property
    def constant(self) -> dict[str, int]:
        """Resident bytes by category, for :func:`fxmem.memory.simulation.simulate`."""
        return _by_category(self.resident)

    @property
    def backward_constant(self) -> dict[str, int]:
        """Bytes by category held from the backward's start on."""
        return _by_category(self.during_backward)

    @property
    def epilogue_points(self) -> list[tuple[str, dict[str, int]]]:
        """The epilogue for :func:`fxmem.memory.simulation.simulate`."""
        return [(label, {Category.TEMPORARIES: int(nbytes)}) for label, nbytes in self.epilogue]

    def key(self) -> str:
        """A stable text of the context, for cache keys."""
        return repr((self.resident, self.epilogue, self.during_backward))


def _by_category(pairs) -> dict[str, int]:
    out: dict[str, int] = {}
    for category, nbytes in pairs:
        out[category] = out.get(category, 0) + int(nbytes)
    return out
