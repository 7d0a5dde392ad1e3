"""Fréchet distance between feature distributions (FID when the features are clean-fid's Inception ones).

`frechet_distance(real_features, fake_features)` fits Gaussians to two feature sets and returns clean-fid's
formula, with the matrix square root's trace taken from symmetric eigendecompositions (`trace_sqrt_product`)
rather than `scipy.linalg.sqrtm`, whose `disp` argument, which clean-fid passes, newer SciPy releases removed.
Feature extractors map images in [-1, 1], [B, C, H, W], to features [B, F]:
- `InceptionFeatures`: clean-fid's Inception-v3 with its "clean" resize to 299x299 (the standard FID; its weights
  are downloaded by clean-fid on first use, so offline it fails with a one-line error);
- `digits_features`: the 64-d penultimate layer of the digits classifier (offline, for sklearn digits);
- "shapes": the 128-d penultimate layer of the shapes-benchmark classifier (`nets/shapes.py`; offline, for RGB
  shapes images of any size from 16, one network per size);
- any module or `"package.module:factory"` returning such a module.

`check_feature_extractor(name, sample_shape)` says before training whether an extractor takes the data's images: the
digits network only 1x8x8, the shapes network 3xSxS (S >= 16), Inception grey or RGB, and a user's module is built
and tried on a batch of two images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rewardtune.errors import PluginError, RecipeError
from rewardtune.quiet import quiet_libraries

DIGITS_SHAPE = (1, 8, 8)  # what the digits classifier takes (sklearn's 8x8 grey digits)
INCEPTION_CHANNELS = (1, 3)  # grey images are repeated to RGB; Inception's resize takes any height and width


def gaussian_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = features.double().cpu().numpy()
    return x.mean(axis=0), np.cov(x, rowvar=False)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2: S1 S2 is similar to S1^(1/2) S2 S1^(1/2), which is symmetric PSD,
    so the trace is the sum of the square roots of that matrix's eigenvalues (rounding negatives clipped to 0)."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) between Gaussian fits of two feature sets [N, F].

    Raises:
        ValueError: a set of fewer than two features (no covariance to fit).
    """
    if min(real.shape[0], fake.shape[0]) < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 features per set, got {real.shape[0]} and {fake.shape[0]}")
    mu1, sigma1 = gaussian_statistics(real)
    mu2, sigma2 = gaussian_statistics(fake)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


class InceptionFeatures(nn.Module):
    """clean-fid's Inception-v3 pool features (2048-d) of images in [-1, 1], with clean-fid's "clean" resize."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        from cleanfid.features import build_feature_extractor
        from cleanfid.resize import build_resizer

        try:
            with quiet_libraries():  # offline, the one-line error below is all that is printed
                self.model = build_feature_extractor("clean", device=torch.device(device), use_dataparallel=False)
        except Exception as err:  # noqa: BLE001 (download and load errors of several types)
            raise PluginError(
                f"cannot build clean-fid's Inception ({type(err).__name__}: {str(err)[:120]}); offline, set "
                "eval.feature_extractor to a local module (\"package.module:factory\") or 'digits'"
            ) from None
        self.resize = build_resizer("clean")
        self.device_ = torch.device(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        uint8 = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        resized = np.stack([self.resize(img) for img in uint8])  # [B, 299, 299, 3] float 0..255
        batch = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device_)
        return torch.as_tensor(self.model(batch)).float().cpu()


class DigitsFeatures(nn.Module):
    """Penultimate (64-d) features of the cached digits classifier (`nets.digits`)."""

    def __init__(self) -> None:
        super().__init__()
        from rewardtune.nets.digits import load_digits_classifier

        self.classifier = load_digits_classifier()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float().cpu())

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """The digit the classifier sees in each image: int64 [B] (a conditional run's class accuracy)."""
        return self.classifier(images.float().cpu()).argmax(1)


def build_feature_extractor(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """'inception', 'digits', 'shapes', or "package.module:factory" (a callable returning a module)."""
    if name == "inception":
        return InceptionFeatures(device)
    if name == "digits":
        return DigitsFeatures()
    if name == "shapes":
        from rewardtune.nets.shapes import ShapesFeatures

        return ShapesFeatures()
    if ":" in name:
        from rewardtune.imports import call_factory_path

        module = call_factory_path(name, f"feature extractor {name!r}")
        if not callable(module):
            raise PluginError(f"feature extractor {name!r} returned {type(module).__name__}, not a module")
        return module
    raise PluginError(f"unknown feature extractor {name!r}: use 'inception', 'digits', 'shapes' or \"package.module:factory\"")


def check_feature_extractor(name: str, sample_shape: tuple[int, ...]) -> nn.Module | None:
    """Raise a one-line error unless extractor `name` takes images of `sample_shape` (C, H, W) and returns [B, F].

    'digits', 'shapes' and 'inception' are checked from the shape alone (nothing is downloaded; None is returned). A
    "package.module:factory" is built and tried on two images; the module is returned, for the evaluator to keep.
    """
    if name == "digits":
        if tuple(sample_shape) != DIGITS_SHAPE:
            raise RecipeError(
                f"eval.feature_extractor = 'digits' takes 1x8x8 grey digits, but this data's images are "
                f"{'x'.join(map(str, sample_shape))}: use 'inception' or a \"package.module:factory\""
            )
        return None
    if name == "shapes":
        from rewardtune.data.shapes import MIN_SIZE

        channels, height, width = (tuple(sample_shape) + (0, 0, 0))[:3]
        if len(sample_shape) != 3 or channels != 3 or height != width or height < MIN_SIZE:
            raise RecipeError(
                f"eval.feature_extractor = 'shapes' takes RGB shapes images 3xSxS with S >= {MIN_SIZE}, but this data's "
                f"images are {'x'.join(map(str, sample_shape))}: use 'inception' or a \"package.module:factory\""
            )
        return None
    if name == "inception":
        if sample_shape[0] not in INCEPTION_CHANNELS:
            raise RecipeError(
                f"eval.feature_extractor = 'inception' takes grey or RGB images, but this data's have {sample_shape[0]} "
                "channels: use a \"package.module:factory\" for them"
            )
        return None
    module = build_feature_extractor(name)
    probe = torch.zeros(2, *sample_shape)  # [2, C, H, W]
    try:
        with torch.no_grad():
            features = module(probe)
    except Exception as err:  # a user module may raise anything
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise PluginError(
            f"feature extractor {name!r} failed on images of shape {tuple(sample_shape)} ({type(err).__name__}: {reason})"
        ) from err
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != 2:
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise PluginError(
            f"feature extractor {name!r} returned {got} for 2 images of shape {tuple(sample_shape)}; expected "
            "features [2, F]"
        )
    return module
