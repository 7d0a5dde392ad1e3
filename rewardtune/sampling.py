"""Writing samples to disk: arrays (.npz / .npy), an image grid (.png), or a folder of PNGs.

A grid is for looking at: by default `GRID_SAMPLES` images, each enlarged (nearest neighbour, so pixels stay
sharp) to at least `GRID_MIN_PIXELS` on its longer side, in a near-square layout. Arrays and folders hold what
they are asked for (`ARRAY_SAMPLES` by default).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from rewardtune.errors import RewardtuneError

GRID_SAMPLES = 64  # images in a .png grid unless `rewardtune sample -n` says otherwise (8 x 8)
GRID_MIN_PIXELS = 64  # each image of a grid is enlarged by an integer factor to at least this many pixels
ARRAY_SAMPLES = 1000  # samples in an array or a folder unless -n says otherwise


def default_sample_count(output: Path) -> int:
    """How many samples `rewardtune sample -o output` draws without -n: a readable grid, or a batch for metrics."""
    return GRID_SAMPLES if Path(output).suffix.lower() == ".png" else ARRAY_SAMPLES


def image_grid(images: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] in [0, 1] -> one grid image [C, H', W'] in [0, 1]: ceil(sqrt(N)) per row, each image
    enlarged by the integer factor that makes its longer side at least GRID_MIN_PIXELS, 2 white pixels between."""
    from torchvision.utils import make_grid

    scale = max(1, math.ceil(GRID_MIN_PIXELS / max(images.shape[-2:])))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    return make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2, pad_value=1.0)


def write_samples(samples: torch.Tensor, output: Path) -> Path:
    """Write `samples` ([N, D] vectors or [N, C, H, W] images in [-1, 1]) as `output` says; returns the path."""
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix in (".npz", ".npy"):
        output.parent.mkdir(parents=True, exist_ok=True)
        array = samples.numpy()
        np.savez(output, samples=array) if suffix == ".npz" else np.save(output, array)
        return output
    if samples.dim() != 4:
        raise RewardtuneError(f"{output}: vectors are written as .npz or .npy")
    from torchvision.utils import save_image

    images = (samples.clamp(-1, 1) + 1) / 2
    if suffix == ".png":
        output.parent.mkdir(parents=True, exist_ok=True)
        save_image(image_grid(images), str(output))
        return output
    if suffix:
        raise RewardtuneError(f"output {output} must be .npz, .npy, .png or a folder")
    output.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, str(output / f"{i:06d}.png"))
    return output
