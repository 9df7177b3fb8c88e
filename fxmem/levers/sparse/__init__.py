"""The sparse lever: weights stored as their non-zero values (O(nnz) parameters, gradients and
optimizer state), dynamic sparsity (prune and regrow), and the report of what it saves.

``fxmem.sparsify(model, density)`` replaces layers; ``model.sparsity`` is the schedule
(:class:`DynamicSparsity`); ``to_dense(model)`` exports the dense model back. A sparsified model is
planned by ``fxmem.optimize``/``fxmem.estimate`` like any other: its transient dense weights and
O(nnz) state are in the captured graph. ``fxmem.optimize(..., allow=(..., "sparse"))`` sparsifies
the model itself when the other allowed levers cannot meet the budget
(:mod:`fxmem.levers.sparse.fallback`; :class:`SparseLever`).
"""

from fxmem.levers.sparse.density import eligible_layers, layer_densities
from fxmem.levers.sparse.dynamic import DynamicSparsity, LayerUpdate, UpdateRecord
from fxmem.levers.sparse.kernels import choose_kernel, csr_linear, time_kernel, time_kernels
from fxmem.levers.sparse.layers import SparseConv2d, SparseLayer, SparseLinear
from fxmem.levers.sparse.choice import DensityChoice, least_sparsity
from fxmem.levers.sparse.fallback import SparseChoice, SparseFallback, check_sparse_density
from fxmem.levers.sparse.lever import SparseLever
from fxmem.levers.sparse.regrow import rewire
from fxmem.levers.sparse.report import LayerSparsity, SparsityReport, sparsity_report
from fxmem.levers.sparse.sparsify import sparse_layers, sparsify, to_dense

__all__ = [
    "DensityChoice",
    "DynamicSparsity",
    "LayerSparsity",
    "LayerUpdate",
    "SparseChoice",
    "SparseConv2d",
    "SparseFallback",
    "SparseLayer",
    "SparseLever",
    "SparseLinear",
    "SparsityReport",
    "UpdateRecord",
    "check_sparse_density",
    "choose_kernel",
    "csr_linear",
    "eligible_layers",
    "layer_densities",
    "least_sparsity",
    "rewire",
    "sparse_layers",
    "sparsify",
    "sparsity_report",
    "time_kernel",
    "time_kernels",
    "to_dense",
]
