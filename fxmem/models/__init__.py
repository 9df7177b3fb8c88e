"""Reference models used by fxmem's tests, examples and benchmarks."""

from fxmem.models.gpt import GPT, GPTConfig
from fxmem.models.wide_resnet import WideResNet, wide_resnet_28_2

__all__ = ["GPTConfig", "GPT", "WideResNet", "wide_resnet_28_2"]
