"""Writing samples to disk: arrays (.npz / .npy), an image grid (.png), or a folder of PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rewardtune.errors import RewardtuneError


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
        save_image(images, str(output), nrow=int(len(images) ** 0.5) or 1, padding=1, pad_value=1.0)
        return output
    if suffix:
        raise RewardtuneError(f"output {output} must be .npz, .npy, .png or a folder")
    output.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, str(output / f"{i:06d}.png"))
    return output
