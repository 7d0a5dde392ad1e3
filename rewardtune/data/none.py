"""Data `none`: no training data, only the shape of the samples.

Reward fine-tuning of a text-to-image model needs no data (DDPO, Flow-GRPO): the prompts come from `[conditions]`,
the signal from the reward. This source gives the image size the backbone renders at; its data batches are empty
([0, C, H, W]), evaluation reports the reward's metrics (no Fréchet distance: there is nothing to compare with), and
a recipe part that learns from data (an energy, DDPM or flow-matching pretraining) is refused at build.
"""

from __future__ import annotations

import torch


class NoData:
    """The shape of the samples and no data: `images` is None and `sample` gives [0, *sample_shape]."""

    images = None

    def __init__(self, size: int, channels: int = 3) -> None:
        if size < 1 or channels < 1:
            raise ValueError(f"size and channels must be positive, got size {size}, channels {channels}")
        self.shape = (channels, size, size)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """An empty batch: [0, *sample_shape]."""
        return torch.empty((0, *self.shape), device=device)


def build_no_data(*, size: int = 512, channels: int = 3) -> NoData:
    """Data `none`: samples of shape (channels, size, size) and no data (text-to-image reward fine-tuning)."""
    return NoData(size, channels)
