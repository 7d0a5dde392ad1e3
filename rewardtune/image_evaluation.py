"""`ImageEvaluator`: Fréchet distance, precision and recall of sampled images, and sample grids.

Features come from a configurable extractor (`metrics.fid.build_feature_extractor`): clean-fid's Inception for the
standard FID when its weights can be downloaded, the digits classifier offline, or any module. Reference features
are computed once from `reference_samples` data images (all of them when 0); this one reference set serves every
metric. The Fréchet distance uses all of it. Precision and recall build k-NN balls, O(N^2) distances per side, so
they use at most `PR_MAX_FEATURES` features per side: of the reference, a uniformly random subset drawn once with a
fixed seed (`fixed_subset`), the same at every evaluation of a run and across runs of the same data; of the samples,
the first ones, which are already iid draws. (Taking the reference's first rows instead would follow the data's
file order, e.g. one class of a folder sorted by class.)
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

PR_MAX_FEATURES = 10_000  # features per side for precision/recall (their k-NN radii cost O(N^2) distances)
PR_SUBSET_SEED = 0  # the seed of the reference subset precision/recall use


def fixed_subset(rows: torch.Tensor, n: int, seed: int = PR_SUBSET_SEED) -> torch.Tensor:
    """`n` rows of `rows` [N, ...] drawn uniformly without replacement with a fixed `seed`; all N rows, in order, when
    N <= n."""
    if rows.shape[0] <= n:
        return rows
    index = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return rows[index.to(rows.device)]


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
    _pr_reference: torch.Tensor | None = field(default=None, repr=False)

    def draw(self, backbone: GaussianChainPolicy, n: int, generator, guide: Guide | None = None) -> torch.Tensor:
        """n images `backbone.output(x_T)` on the CPU (the image backbones clamp to [-1, 1])."""
        return draw_samples(backbone, n, generator, guide, self.sample_batch)

    def features(self, images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        if self._extractor is None:
            self._extractor = build_feature_extractor(self.feature_extractor, device)
        return torch.cat([self._extractor(images[i : i + 500]).float() for i in range(0, images.shape[0], 500)])

    def reference(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Features of the reference images: all data images, or `fixed_subset` of `reference_samples` of them."""
        if self._reference is None:
            images = self.data.images
            if self.reference_samples:
                images = fixed_subset(images, self.reference_samples, seed=0)
            self._reference = self.features(images, device)
        return self._reference

    def precision_recall_reference(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The reference features precision/recall use: `fixed_subset` of `reference` (all of it up to
        PR_MAX_FEATURES)."""
        if self._pr_reference is None:
            self._pr_reference = fixed_subset(self.reference(device), PR_MAX_FEATURES)
        return self._pr_reference

    def evaluate(
        self, backbone: GaussianChainPolicy, reward: Reward | None, seed: int, guide: Guide | None = None
    ) -> dict[str, float]:
        _, gen = generators(seed, backbone.device)
        fake = self.draw(backbone, self.num_samples, gen, guide)
        fake_features = self.features(fake, backbone.device)
        real_features = self.reference(backbone.device)
        precision, recall = precision_recall(
            self.precision_recall_reference(backbone.device), fake_features[:PR_MAX_FEATURES]
        )
        metrics = {"frechet_distance": frechet_distance(real_features, fake_features), "precision": precision, "recall": recall}
        if reward is not None and not reward.learns:
            with torch.no_grad():
                metrics["reward_mean"] = float(reward(fake[:2000].to(backbone.device)).mean())
            metrics.update(reward.evaluation_metrics(fake.to(backbone.device)))  # e.g. target_class_fraction
        return metrics

    def metric_names(self, reward: Reward | None) -> set[str]:
        """The names `evaluate` reports with `reward` (checked against `eval.keep_best` before training). A reward's
        own `evaluation_metrics` are named by calling it on a few data images."""
        names = {"frechet_distance", "precision", "recall"}
        if reward is not None and not reward.learns:
            with torch.no_grad():
                names |= {"reward_mean", *reward.evaluation_metrics(self.data.images[:8])}
        return names

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
