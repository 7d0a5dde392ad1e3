"""Reward `jpeg`: JPEG compressibility, r(x) = -(size of x encoded as JPEG by PIL) / 1000 bytes (DDPO, Black et al.,
2023).

Images in [-1, 1] (B x C x H x W, C = 1 or 3) are quantised to 8 bits and encoded one by one on the CPU. The encoder
is not differentiable, so `differentiable = False`: DxDP learns the terminal cost with its value function
(`terminal = "value"`, the default) and never needs the reward's gradient.
"""

from __future__ import annotations

import io
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from rewardtune.rewards.base import Reward

__all__ = ["JpegCompressibilityReward", "build_jpeg_reward", "jpeg_size_kb"]


def jpeg_size_kb(image: np.ndarray, quality: int) -> float:
    """Size in kB (1000 bytes) of one uint8 image [H, W] or [H, W, 3] encoded as JPEG at `quality`."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegCompressibilityReward(Reward):
    """r(x) = -JPEG size of x in kB: [B] (float32, on x's device)."""

    name: ClassVar[str] = "jpeg"
    differentiable: ClassVar[bool] = False
    learns: ClassVar[bool] = False

    def __init__(self, *, quality: int = 95) -> None:
        super().__init__()
        if not 1 <= quality <= 95:
            raise ValueError(f"jpeg quality must be in 1..95 (PIL's useful range), got {quality}")
        self.quality = quality

    @torch.no_grad()
    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"jpeg needs images B x C x H x W with C = 1 or 3, got shape {tuple(x.shape)}")
        pixels = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [B, C, H, W]
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, C]
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]  # greyscale: [B, H, W]
        sizes = [jpeg_size_kb(np.ascontiguousarray(image), self.quality) for image in pixels]
        return -torch.tensor(sizes, dtype=torch.float32, device=x.device)


def build_jpeg_reward(sample_shape: tuple[int, ...], /, *, quality: int = 95) -> JpegCompressibilityReward:
    """Reward `jpeg`: minus the JPEG size (kB) at PIL `quality` (1..95)."""
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
        raise ValueError(f"reward 'jpeg' needs images (C, H, W) with C = 1 or 3, got sample shape {tuple(sample_shape)}")
    return JpegCompressibilityReward(quality=quality)
