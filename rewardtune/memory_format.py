"""`train.channels_last = true`: the run's convolution weights in channels-last memory order (issue W2 8/8).

On a GPU, cuDNN's convolutions run in NHWC with tensor cores, and a convolution whose weight is channels-last gives a
channels-last output, so converting the weights once is enough for the UNets' activations to follow. Only 4-D
tensors change order (`nn.Module.to(memory_format=...)`), so vector networks are untouched; the values are the same
and checkpoints are written contiguous (checkpoint.flatten_modules), so a run can switch it on or off across a
resume. Whether it pays is a GPU measurement (scripts/bench_cifar10_gpu.sh); on a CPU it mostly does not.
"""

from __future__ import annotations

import torch
from torch import nn


def to_channels_last(modules: list[nn.Module]) -> int:
    """Put every 4-D parameter and buffer of `modules` in channels-last order, in place; returns how many of their
    tensors are channels-last afterwards (0 for networks without convolutions)."""
    for module in modules:
        module.to(memory_format=torch.channels_last)
    return sum(1 for module in modules for t in (*module.parameters(), *module.buffers()) if is_channels_last(t))


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor stored channels-last (and not also plain contiguous, as a tensor with C = 1 or H = W = 1 is)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
