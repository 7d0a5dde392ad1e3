"""`ImageEvaluator`: Fréchet distance, precision and recall of sampled images, and sample grids.

Features come from a configurable extractor (`metrics.fid.build_feature_extractor`): clean-fid's Inception for the
standard FID when its weights can be downloaded, the digits classifier offline, or any module. Reference features
are computed once from `reference_samples` data images (all of them when 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from rewardtune.backbones.base import GaussianChainPolicy, Guide
from rewardtune.evaluation import draw_samples, generators
from rewardtune.metrics.fid import build_feature_extractor, frechet_distance
from rewardtune.metrics.precision_recall import precision_recall
from rewardtune.rewards.base import Reward


@dataclass
class ImageEvaluator:
    """Metrics `frechet_distance`, `precision`, `recall` (and `reward_mean` for a non-learning reward)."""

    data: object
    num_samples: int = 10000
    feature_extractor: str = "inception"
    reference_samples: int = 0
    sample_batch: int = 500
    grid_size: int = 64
    _extractor: torch.nn.Module | None = field(default=None, repr=False)
    _reference: torch.Tensor | None = field(default=None, repr=False)

    def draw(self, backbone: GaussianChainPolicy, n: int, generator, guide: Guide | None = None) -> torch.Tensor:
        """n images x_T on the CPU, clamped to [-1, 1]."""
        return draw_samples(backbone, n, generator, guide, self.sample_batch, clamp=1.0)

    def features(self, images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        if self._extractor is None:
            self._extractor = build_feature_extractor(self.feature_extractor, device)
        return torch.cat([self._extractor(images[i : i + 500]).float() for i in range(0, images.shape[0], 500)])

    def reference(self, device: torch.device | str = "cpu") -> torch.Tensor:
        if self._reference is None:
            images = self.data.images
            if self.reference_samples:
                images = images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[: self.reference_samples]]
            self._reference = self.features(images, device)
        return self._reference

    def evaluate(
        self, backbone: GaussianChainPolicy, reward: Reward | None, seed: int, guide: Guide | None = None
    ) -> dict[str, float]:
        _, gen = generators(seed, backbone.device)
        fake = self.draw(backbone, self.num_samples, gen, guide)
        fake_features = self.features(fake, backbone.device)
        real_features = self.reference(backbone.device)
        precision, recall = precision_recall(real_features[:10000], fake_features[:10000])
        metrics = {"frechet_distance": frechet_distance(real_features, fake_features), "precision": precision, "recall": recall}
        if reward is not None and not reward.learns:
            with torch.no_grad():
                metrics["reward_mean"] = float(reward(fake[:2000].to(backbone.device)).mean())
            metrics.update(reward.evaluation_metrics(fake.to(backbone.device)))  # e.g. target_class_fraction
        return metrics

    def plot(self, backbone: GaussianChainPolicy, reward: Reward | None, path: Path, seed: int, title: str = "") -> None:
        """A grid of `grid_size` samples."""
        from torchvision.utils import save_image

        _, gen = generators(seed, backbone.device)
        images = self.draw(backbone, self.grid_size, gen)
        scale = max(1, 32 // images.shape[-1])  # small images (8x8 digits) are enlarged so people can see them
        if scale > 1:
            images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
        nrow = int(self.grid_size**0.5)
        save_image((images + 1) / 2, str(path), nrow=nrow, padding=2, pad_value=1.0)
