"""Wide Residual Network (Zagoruyko & Komodakis, 2016) for small images.

WRN-d-k has ``(d - 4) / 6`` pre-activation basic blocks in each of three groups of
widths ``16k, 32k, 64k`` (strides 1, 2, 2).  WRN-28-2 has about 1.47M parameters.
The network ends in an adaptive average pool, so any input of at least 8x8 works
(32x32 CIFAR images, 8x8 scikit-learn digits, ...).  All ReLUs are out-of-place so
that every activation is a distinct tensor, which keeps memory accounting simple.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WideResNet", "BasicBlock", "wide_resnet_28_2"]


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut.

    When the shape changes (stride or channel count), the shortcut is a 1x1 conv on the
    pre-activated input, as in the reference WRN implementation.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.relu2(self.bn2(y)))
        residual = x if self.shortcut is None else self.shortcut(o)
        return y + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``.

    ``forward(x, targets=None)`` takes images ``(batch, in_channels, H, W)`` with
    ``H, W >= 8``; with ``targets`` (int64 class ids, shape ``(batch,)``) it returns
    the scalar mean cross-entropy, otherwise logits ``(batch, num_classes)``.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 2,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must satisfy (depth - 4) % 6 == 0 and depth >= 10 "
                f"(e.g. 16, 22, 28, 40), got {depth!r}"
            )
        for name, value in (
            ("widen_factor", widen_factor),
            ("num_classes", num_classes),
            ("in_channels", in_channels),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"WideResNet {name} must be a positive int, got {value!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth = depth
        self.widen_factor = widen_factor

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(widths[0], widths[1], n, stride=1)
        self.block2 = self._make_group(widths[1], widths[2], n, stride=2)
        self.block3 = self._make_group(widths[2], widths[3], n, stride=2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_group(in_planes: int, out_planes: int, n: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, out_planes, stride)]
        layers += [BasicBlock(out_planes, out_planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn(out))
        logits = self.fc(torch.flatten(self.pool(out), 1))
        if targets is None:
            return logits
        return F.cross_entropy(logits, targets)


def wide_resnet_28_2(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-28-2 (about 1.47M parameters with 10 classes and 3 input channels)."""
    return WideResNet(depth=28, widen_factor=2, num_classes=num_classes, in_channels=in_channels)
