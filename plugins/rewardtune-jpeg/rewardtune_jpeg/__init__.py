"""Reward `jpeg`: JPEG compressibility, r(x) = -scale * (size of x encoded as JPEG by PIL, in kB) (DDPO, Black et al.,
2023).

Images in [-1, 1] (B x C x H x W, C = 1 or 3) are quantised to 8 bits, optionally enlarged `upscale` times by
pixel repetition, and encoded one by one on the CPU. JPEG codes 8 x 8 blocks after a header of about 330 bytes, so
a tiny image (sklearn's 8 x 8 digits are ONE block) is almost all header and its size barely depends on its content:
`upscale = 4` turns each pixel into a 4 x 4 patch, and the coded size then follows the image's edges and noise (on
real digits: 0.59-0.93 kB against 0.34 kB for a blank image, quality 95).

The encoder is not differentiable, so `differentiable = False`: DxDP learns the terminal cost with its value function
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


def to_uint8_images(x: torch.Tensor, upscale: int) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H*upscale, W*upscale(, 3)] (pixel repetition; greyscale drops C)."""
    pixels = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if upscale > 1:
        pixels = pixels.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, C]
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


class JpegCompressibilityReward(Reward):
    """r(x) = -scale * JPEG size of x in kB: [B] (float32, on x's device)."""

    name: ClassVar[str] = "jpeg"
    differentiable: ClassVar[bool] = False
    learns: ClassVar[bool] = False

    def __init__(self, *, quality: int = 95, upscale: int = 1, scale: float = 1.0) -> None:
        super().__init__()
        if not 1 <= quality <= 95:
            raise ValueError(f"jpeg quality must be in 1..95 (PIL's useful range), got {quality}")
        if upscale < 1:
            raise ValueError(f"jpeg upscale must be a positive integer, got {upscale}")
        if not scale > 0:
            raise ValueError(f"jpeg scale must be positive, got {scale}")
        self.quality, self.upscale, self.scale = quality, upscale, scale

    def sizes_kb(self, x: torch.Tensor) -> torch.Tensor:
        """JPEG size of each image in kB: [B] (float32, on x's device)."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"jpeg needs images B x C x H x W with C = 1 or 3, got shape {tuple(x.shape)}")
        images = to_uint8_images(x, self.upscale)
        sizes = [jpeg_size_kb(np.ascontiguousarray(image), self.quality) for image in images]
        return torch.tensor(sizes, dtype=torch.float32, device=x.device)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        return -self.scale * self.sizes_kb(x)

    @torch.no_grad()
    def evaluation_metrics(self, x: torch.Tensor) -> dict[str, float]:
        """The mean JPEG size in kB (what the reward lowers), unscaled."""
        return {"jpeg_kb": float(self.sizes_kb(x).mean())}


def build_jpeg_reward(
    sample_shape: tuple[int, ...], /, *, quality: int = 95, upscale: int = 1, scale: float = 1.0
) -> JpegCompressibilityReward:
    """Reward `jpeg`: minus `scale` times the JPEG size (kB) at PIL `quality` (1..95), after enlarging each image
    `upscale` times by pixel repetition (use 4 for 8 x 8 images, which are otherwise all header)."""
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
        raise ValueError(f"reward 'jpeg' needs images (C, H, W) with C = 1 or 3, got sample shape {tuple(sample_shape)}")
    return JpegCompressibilityReward(quality=quality, upscale=upscale, scale=scale)
