"""Optimisation over plain data (node ids, sizes, costs). Solvers never import torch.fx."""

__all__: list[str] = []
