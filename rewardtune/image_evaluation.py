"""`ImageEvaluator`: Fréchet distance, precision and recall of sampled images, and sample grids.

Features come from a configurable extractor (`metrics.fid.build_feature_extractor`): clean-fid's Inception for the
standard FID when its weights can be downloaded, the digits classifier offline, or any module. Reference features
are computed once from `reference_samples` data images (all of them when 0); this one reference set serves every
metric. The Fréchet distance uses all of it. Precision and recall build k-NN balls, O(N^2) distances per side, so
they use at most `PR_MAX_FEATURES` features per side: of the reference, a uniformly random subset drawn once with a
fixed seed (`fixed_subset`), the same at every evaluation of a run and across runs of the same data; of the samples,
the first ones, which are already iid draws. (Taking the reference's first rows instead would follow the data's
file order, e.g. one class of a folder sorted by class.)

A conditional run (`conditions`) samples every training condition equally (conditional_evaluation.py). The pooled
metrics compare all samples with the reference; with class labels and labelled data each class also gets its
Fréchet distance against that class's data images ("frechet_distance/class k"), and a feature extractor that can
classify (the digits classifier) gives `class_accuracy`. The grid shows one row per condition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from rewardtune.backbones.base import GaussianChainPolicy, Guide
from rewardtune.conditional_evaluation import (
    class_accuracy,
    per_condition_count,
    reward_metrics_by_split,
    within_condition_diversity,
)
from rewardtune.conditions import Conditions
from rewardtune.evaluation import draw_samples, generators
from rewardtune.metrics.fid import build_feature_extractor, frechet_distance
from rewardtune.metrics.precision_recall import precision_recall
from rewardtune.rewards.base import Reward, call_reward, reward_input

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
    _class_reference: dict | None = field(default=None, repr=False)

    def draw(
        self, backbone: GaussianChainPolicy, n: int, generator, guide: Guide | None = None, condition=None
    ) -> torch.Tensor:
        """n images `backbone.output(x_T)` on the CPU (the image backbones clamp to [-1, 1]), chain i under row i of
        `condition` (or unconditional)."""
        return draw_samples(backbone, n, generator, guide, self.sample_batch, condition)

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

    def class_reference(self, label: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Features of the data images of class `label` (labelled data only)."""
        if self._class_reference is None:
            self._class_reference = {}
        if label not in self._class_reference:
            self._class_reference[label] = self.features(self.data.images[self.data.labels == label], device)
        return self._class_reference[label]

    def evaluate(
        self, backbone: GaussianChainPolicy, reward: Reward | None, seed: int, guide: Guide | None = None,
        conditions=None,
    ) -> dict[str, float]:
        _, gen = generators(seed, backbone.device)
        condition, per = None, 0
        if conditions is not None:
            per = per_condition_count(self.num_samples, conditions)
            condition = conditions.evaluation_conditions("train", per, backbone.device)
        fake = self.draw(backbone, self.num_samples if condition is None else len(condition), gen, guide, condition)
        if self.data.images is None:  # data `none`: the reward's metrics only
            return self.reward_metrics(fake, reward, backbone, gen, guide, conditions, condition, per)
        fake_features = self.features(fake, backbone.device)
        real_features = self.reference(backbone.device)
        precision, recall = precision_recall(
            self.precision_recall_reference(backbone.device), fake_features[:PR_MAX_FEATURES]
        )
        metrics = {"frechet_distance": frechet_distance(real_features, fake_features), "precision": precision, "recall": recall}
        if condition is not None:
            metrics["diversity"] = within_condition_diversity(fake_features, condition.keys())
            metrics.update(self.per_class_metrics(fake, fake_features, condition, backbone.device))
        return metrics | self.reward_metrics(fake, reward, backbone, gen, guide, conditions, condition, per)

    def reward_metrics(self, fake, reward, backbone, gen, guide, conditions, condition, per: int) -> dict[str, float]:
        """The reward's metrics of the samples `fake`: per condition and split for a conditional run
        (`reward_metrics_by_split`, `per` samples of each condition), else `reward_mean` and the reward's own
        `evaluation_metrics`. A learning reward has no `reward_mean` (it moves with the reward), only its own
        metrics (a composite's: those of its terms, e.g. a verifier's accuracy beside a learned energy)."""
        if reward is None or (reward.learns and not reward.reports_evaluation_metrics):
            return {}
        if condition is not None:
            draw = lambda c: self.draw(backbone, len(c), gen, guide, c)
            return reward_metrics_by_split(reward, conditions, condition, fake, per, draw, backbone.device)
        metrics = {}
        if not reward.learns:
            with torch.no_grad():
                metrics["reward_mean"] = float(call_reward(reward, fake[:2000].to(backbone.device)).mean())
        return metrics | reward.evaluation_metrics(reward_input(reward, fake.to(backbone.device)))  # e.g. a class rate

    def per_class_metrics(
        self, fake: torch.Tensor, fake_features: torch.Tensor, condition: Conditions, device
    ) -> dict[str, float]:
        """Class-labelled samples: `frechet_distance/class k` against class k's data images (labelled data; for each
        class with at least two samples, which a Gaussian fit needs), and `class_accuracy` (pooled and per class) when
        the feature extractor can classify."""
        metrics: dict[str, float] = {}
        if condition.labels is None:
            return metrics
        labels = condition.labels.cpu()
        if getattr(self.data, "labels", None) is not None:
            for k in labels.unique().tolist():
                if int((labels == k).sum()) < 2:
                    continue
                reference = self.class_reference(int(k), device)
                metrics[f"frechet_distance/class {k}"] = frechet_distance(reference, fake_features[labels == k])
        if hasattr(self._extractor, "classify"):
            metrics.update(class_accuracy(self._extractor.classify(fake), condition))
        return metrics

    def metric_names(self, reward: Reward | None) -> set[str]:
        """The names `evaluate` reports with `reward` (checked against `eval.keep_best` before training). A reward's
        own `evaluation_metrics` are named by calling it on a few data images."""
        names = set() if self.data.images is None else {"frechet_distance", "precision", "recall"}
        if reward is not None and (not reward.learns or reward.reports_evaluation_metrics):
            probe = torch.zeros(8, *self.data.sample_shape) if self.data.images is None else self.data.images[:8]
            with torch.no_grad():
                names |= {*([] if reward.learns else ["reward_mean"]), *reward.evaluation_metrics(reward_input(reward, probe))}
        return names

    def plot(
        self, backbone: GaussianChainPolicy, reward: Reward | None, path: Path, seed: int, title: str = "",
        conditions=None,
    ) -> None:
        """A grid of `grid_size` samples; conditional: one row of samples per condition (up to 16 conditions)."""

        _, gen = generators(seed, backbone.device)
        if conditions is not None:
            keys = len(conditions.source.train_keys)
            per = max(1, self.grid_size // min(keys, 16))
            condition = conditions.evaluation_conditions("train", per, backbone.device)
            rows = min(len(condition), per * 16)
            images = self.draw(backbone, rows, gen, None, condition.select(list(range(rows))))
            save_grid(images, path, nrow=per)
            return
        images = self.draw(backbone, self.grid_size, gen)
        save_grid(images, path, nrow=int(self.grid_size**0.5))


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """Images in [-1, 1] as a PNG grid of `nrow` columns; small images (8x8 digits) are enlarged so people can see
    them."""
    from torchvision.utils import save_image

    scale = max(1, 32 // images.shape[-1])
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    save_image((images + 1) / 2, str(path), nrow=nrow, padding=2, pad_value=1.0)
