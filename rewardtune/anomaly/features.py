"""Frozen CNN features for anomaly detection (UniAD / MPDR / DxMI §5.3 preprocessing).

An image [C, H, W] in [0, 1] becomes a feature map [D, h, w]: the chosen layers of a frozen CNN, each resized to a
common `grid` x `grid` (average pooling for larger maps, bilinear upsampling for smaller ones) and concatenated along
channels. Every spatial feature vector is one data point; `to_sphere` projects it onto the unit sphere S^{D-1}
("the direction of the feature often represents the original image better than its magnitude", Appendix C.3).

Extractors (`build_feature_extractor(spec)`):
- a timm model name, e.g. "efficientnet_b4" (UniAD's and the paper's: its first four stages, timm `out_indices`
  0-3, 24 + 32 + 56 + 160 = 272 channels at strides 2-16, pooled to 14 x 14 at 224²), with ImageNet weights from the hub (`pretrained`), from a local file (`weights`), or random
  (`pretrained = false`); inputs are normalised with the model's own mean/std;
- "digits_cnn": the digits classifier's two convolutional layers (`nets/digits.py`, trained offline in seconds) at
  8 x 8, the scale it was trained at: the image is area-downsampled to 8 x 8 and mapped to [-1, 1]; 32 + 64 = 96
  channels on an 8 x 8 grid. It ships offline, which is why the offline benchmark uses it;
- "pkg.module:factory": `factory()` returns a module mapping [N, C, H, W] in [0, 1] to one feature map [N, D, h, w]
  or a list of them (resized to the grid and concatenated like the built-ins').
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.errors import RecipeError
from rewardtune.imports import call_factory_path
from rewardtune.nets.autoencoder import to_sphere


def resize_to_grid(maps: Sequence[torch.Tensor], grid: int) -> torch.Tensor:
    """Feature maps [N, D_i, h_i, w_i] -> one map [N, sum D_i, grid, grid]: larger maps average-pooled (no aliasing),
    smaller ones bilinearly upsampled (align_corners=False)."""
    resized = []
    for m in maps:
        if m.shape[-1] >= grid and m.shape[-2] >= grid:
            resized.append(F.adaptive_avg_pool2d(m, grid))
        else:
            resized.append(F.interpolate(m, size=(grid, grid), mode="bilinear", align_corners=False))
    return torch.cat(resized, dim=1)


class FeatureExtractor(nn.Module):
    """A frozen multi-layer CNN feature pipeline: images [N, C, H, W] in [0, 1] -> [N, D, grid, grid].

    Args:
        body: module mapping the prepared images to a feature map or a list of them.
        grid: the common spatial size the maps are resized to.
        channels: image channels the body takes (1 or 3); grey images are repeated to 3 channels, RGB ones averaged
            to 1.
        image_size: images are resized to image_size² first (None: as given).
        mean, std: per-channel input normalisation after the [0, 1] scaling (None: none).
        name: the spec it was built from (cache keys, messages).
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        grid: int,
        channels: int,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.body = body.eval().requires_grad_(False)
        self.grid, self.channels, self.image_size, self.name = grid, channels, image_size, name
        shape = (1, channels, 1, 1)
        self.register_buffer("mean", torch.tensor(mean or [0.0] * channels).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std or [1.0] * channels).view(shape), persistent=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [0, 1] -> the body's input: channels matched, resized, normalised."""
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if images.shape[1] != self.channels:
            images = images.mean(1, keepdim=True) if self.channels == 1 else images.expand(-1, self.channels, -1, -1)
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.body(self.prepare(images.float()))
        maps = [out] if isinstance(out, torch.Tensor) else list(out)
        return resize_to_grid(maps, self.grid)

    def train(self, mode: bool = True) -> FeatureExtractor:  # frozen: always in eval mode
        return super().train(False)


class DigitsConvFeatures(nn.Module):
    """The digits classifier's conv1 and conv2 activations (ReLU) at 8 x 8: [N, 1, 8, 8] in [-1, 1] -> two maps."""

    def __init__(self) -> None:
        super().__init__()
        from rewardtune.nets.digits import load_digits_classifier

        classifier = load_digits_classifier()
        self.conv1, self.conv2 = classifier.conv1, classifier.conv2

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h1 = F.relu(self.conv1(x))
        return [h1, F.relu(self.conv2(h1))]


class AreaTo(nn.Module):
    """Area-downsample to size² and map [0, 1] to [-1, 1] (the digits classifier's input)."""

    def __init__(self, size: int, body: nn.Module) -> None:
        super().__init__()
        self.size, self.body = size, body

    def forward(self, x: torch.Tensor):
        return self.body(F.adaptive_avg_pool2d(x, self.size) * 2 - 1)


def build_feature_extractor(
    spec: str,
    *,
    layers: Sequence[int] = (0, 1, 2, 3),
    grid: int = 14,
    image_size: int | None = 224,
    pretrained: bool = True,
    weights: str = "",
) -> FeatureExtractor:
    """The extractor named by `spec` (see the module docstring). `layers` are the timm feature stages
    (`out_indices`); `weights` a local weights file for a timm model (then nothing is downloaded).

    Raises:
        RecipeError: one line: an unknown timm model, weights that cannot be fetched (offline) or read, a factory that
            cannot be imported or returns no module.
    """
    if spec == "digits_cnn":
        return FeatureExtractor(AreaTo(8, DigitsConvFeatures()), grid=8, channels=1, image_size=None, name=spec)
    if ":" in spec:
        return user_extractor(spec, grid=grid, image_size=image_size)
    return timm_extractor(spec, layers=layers, grid=grid, image_size=image_size, pretrained=pretrained, weights=weights)


def user_extractor(spec: str, *, grid: int, image_size: int | None) -> FeatureExtractor:
    """`factory()` from "pkg.module:factory"; the module may set `channels` (default 3). Import failures and what the
    factory raises are one-line PluginErrors (`imports.call_factory_path`)."""
    body = call_factory_path(spec, "feature extractor")
    if not isinstance(body, nn.Module):
        raise RecipeError(f"feature extractor factory {spec!r} returned {type(body).__name__}, not a torch.nn.Module")
    return FeatureExtractor(body, grid=grid, channels=int(getattr(body, "channels", 3)), image_size=image_size, name=spec)


def timm_extractor(
    name: str, *, layers: Sequence[int], grid: int, image_size: int | None, pretrained: bool, weights: str
) -> FeatureExtractor:
    """A timm model with `features_only=True` and `out_indices=layers`; ImageNet weights from the hub, `weights` (a
    local .safetensors/.pth file) or none."""
    import timm

    if name not in timm.list_models():
        raise RecipeError(f"unknown feature extractor {name!r}: a timm model name, \"digits_cnn\" or \"pkg.module:factory\"")
    kwargs: dict = {"features_only": True, "out_indices": tuple(layers)}
    if weights:
        if not Path(weights).is_file():
            raise RecipeError(f"feature extractor weights {weights!r} do not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    else:
        kwargs["pretrained"] = pretrained
    try:
        body = timm.create_model(name, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:  # an offline hub, a corrupt or mismatched file
        where = weights or "the Hugging Face hub"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(
            f"cannot load {name} weights from {where} ({first[:160]}); offline, pass weights = \"/path/to/{name}.safetensors\""
        ) from None
    cfg = body.pretrained_cfg
    return FeatureExtractor(
        body, grid=grid, channels=3, image_size=image_size, mean=cfg.get("mean"), std=cfg.get("std"), name=name
    )


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, images: torch.Tensor, *, batch_size: int = 64, sphere: bool = True,
    reporter=None, description: str = "features",
) -> torch.Tensor:
    """Feature maps of images [N, C, H, W] in [0, 1], in batches: [N, D, grid, grid]; with `sphere` every spatial
    vector is projected onto the unit sphere. A `reporter` (progress.RichReporter or any Reporter) shows the images
    done as a stage called `description`."""
    device = next(iter(extractor.buffers())).device
    total = images.shape[0]
    if reporter is not None:
        reporter.start(total, 0, description)
    out = []
    try:
        for start in range(0, total, batch_size):
            maps = extractor(images[start : start + batch_size].to(device))
            out.append((to_sphere(maps, dim=1) if sphere else maps).cpu())
            if reporter is not None:
                reporter.advance(min(start + batch_size, total), {})
    finally:
        if reporter is not None:
            reporter.stop()
    return torch.cat(out)


def features_cache_path(settings: dict) -> Path:
    """Where features for these settings are cached: $REWARDTUNE_CACHE/anomaly_features/<sha256 of the settings>."""
    from rewardtune.nets.cache import cache_dir

    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / "anomaly_features" / f"{key}.safetensors"


def cached_features(settings: dict, compute, use_cache: bool) -> dict[str, torch.Tensor]:
    """`compute()` -> {name: tensor}, stored as safetensors under `features_cache_path(settings)` and read back on the
    next call with the same settings (a corrupt file is recomputed)."""
    import os

    from safetensors.torch import load_file, save_file

    if not use_cache:
        return compute()
    path = features_cache_path(settings)
    if path.exists():
        try:
            return load_file(str(path))
        except Exception:  # noqa: BLE001 (a corrupt cache, whatever the error, is rebuilt)
            path.unlink(missing_ok=True)
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return tensors
