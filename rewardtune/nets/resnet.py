"""The DxMI image energy/value: a ResNet without normalisation layers (IGEBM-style; DxMI paper, Appendix C.2).

conv stem -> 6 residual blocks (LeakyReLU 0.2; average-pool downsampling after blocks 1, 3 and 5; channels
c, c, 2c, 2c, 2c, 2c) -> ReLU -> spatial sum -> linear head -> learned output scale. About 5M parameters at 32x32
with c = 128. Time-independent: one network is both the energy and the value for every t (Algorithm 2).

Conditional E(x, c) (a class-conditional EBM): the projection discriminator's form (Miyato & Koyama 2018),
E(x, c) = head(h) + <emb(c), h> with h the pooled features, so the condition shifts the energy along the features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.nets.conditioning import ConditionEmbedding, Conditioning
from rewardtune.nets.value import ValueFunction


class ResBlock(nn.Module):
    """x + conv(lrelu(conv(lrelu(x)))), with a 1x1 skip when the channel count changes; optional 2x avg-pool."""

    def __init__(self, c_in: int, c_out: int, *, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(x, 0.2))
        h = self.conv2(F.leaky_relu(h, 0.2))
        out = self.skip(x) + h
        return F.avg_pool2d(out, 2) if self.downsample and min(out.shape[-2:]) >= 2 else out


class ResNetEnergy(nn.Module):
    """E(x) (or E(x, c)) for images [B, C, H, W] -> [B]."""

    def __init__(self, in_channels: int = 3, channels: int = 128, conditioning: Conditioning | None = None) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Conv2d(in_channels, c, 3, padding=1)
        widths = [(c, c), (c, c), (c, 2 * c), (2 * c, 2 * c), (2 * c, 2 * c), (2 * c, 2 * c)]
        self.blocks = nn.ModuleList(
            ResBlock(a, b, downsample=i in (0, 2, 4)) for i, (a, b) in enumerate(widths)
        )
        self.head = nn.Linear(2 * c, 1)
        self.out_scale = nn.Linear(1, 1)  # learned scalar affine output
        self.condition = ConditionEmbedding(conditioning, 2 * c, zero_init=True) if conditioning is not None else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        h = F.relu(h).sum(dim=(2, 3))  # [B, 2c], spatial sum
        out = self.head(h)  # [B, 1]
        if self.condition is not None:
            out = out + (self.condition(c, h.shape[0], h.device) * h).sum(1, keepdim=True)
        elif c is not None:
            raise ValueError("this ResNet energy is unconditional but was given a condition")
        return self.out_scale(out).view(-1)


def build_resnet_value(
    sample_shape: tuple[int, ...],
    conditioning: Conditioning | None = None,
    /,
    *,
    channels: int = 128,
    lr: float = 1e-5,
    grad_clip: float | None = None,
) -> ValueFunction:
    """Value `resnet`: the time-independent ResNet V(x) of DxMI's image experiments (shared with the energy)."""
    if len(sample_shape) != 3:
        raise ValueError(f"value 'resnet' needs images (C, H, W), got sample shape {sample_shape}")
    net = ResNetEnergy(sample_shape[0], channels, conditioning)
    return ValueFunction(net, lr=lr, time_dependent=False, grad_clip=grad_clip, conditioning=conditioning)
