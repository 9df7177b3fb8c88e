"""fxmem: fit a PyTorch training step into an absolute memory budget.

Capture the step as a joint forward+backward FX graph, predict its peak bytes with a storage-level
memory model, measure what the allocator really saw, and rewrite the step (recomputation chosen by
an ILP) so that its peak stays under a budget given in bytes.
"""

from fxmem.budget import BudgetError, format_bytes, parse_budget
from fxmem.graph.capture import CapturedStep, Role, capture_step, loss_from_output
from fxmem.errors import CaptureError, FxmemError, MicrobatchError, StepInputError
from fxmem.api.estimate import MemoryEstimate, estimate
from fxmem.memory.measure import MeasuredMemory, measure_memory, measure_peak
from fxmem.api.optimize import OptimizedModule, floor, optimize
from fxmem.planning.planner import Plan, PlanOptions
from fxmem.api.workload import Workload, load_workload
from fxmem.levers.sparse import SparsityReport, sparsify, to_dense
from fxmem.levers.precision.optimizer_state import low_bit_optimizer

__all__ = [
    "BudgetError",
    "CaptureError",
    "CapturedStep",
    "FxmemError",
    "MeasuredMemory",
    "MemoryEstimate",
    "MicrobatchError",
    "OptimizedModule",
    "Plan",
    "PlanOptions",
    "Role",
    "SparsityReport",
    "StepInputError",
    "Workload",
    "capture_step",
    "estimate",
    "floor",
    "format_bytes",
    "load_workload",
    "loss_from_output",
    "low_bit_optimizer",
    "measure_memory",
    "measure_peak",
    "optimize",
    "parse_budget",
    "sparsify",
    "to_dense",
]

__version__ = "0.1.0"
