"""Models shared by the tests: a randomly shaped network and one that is not one graph."""

import torch
import torch.nn as nn
from hypothesis import strategies as st

LAYERS = ["linear", "gelu", "tanh", "norm", "dropout", "residual"]


def random_net_spec():
    return st.lists(st.sampled_from(LAYERS), min_size=3, max_size=9)


class RandomNet(nn.Module):
    """A randomly shaped network: linear layers, activations, dropout, norms, residuals."""

    def __init__(self, spec, width):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList()
        for kind in spec:
            if kind == "linear":
                self.layers.append(nn.Linear(width, width))
            elif kind == "norm":
                self.layers.append(nn.LayerNorm(width))
            elif kind == "dropout":
                self.layers.append(nn.Dropout(0.3))
            else:
                self.layers.append(nn.Identity())
        self.head = nn.Linear(width, 3)

    def forward(self, x, y):
        skip = x
        for kind, layer in zip(self.spec, self.layers):
            if kind == "gelu":
                x = torch.nn.functional.gelu(x)
            elif kind == "tanh":
                x = torch.tanh(x)
            elif kind == "residual":
                x, skip = x + skip, x
            else:
                x = layer(x)
        return torch.nn.functional.cross_entropy(self.head(x), y)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            h = h * 2
        return h.pow(2).mean()
