"""Reward `digits_classifier`: r(x) = log p(target_class | x) under a small CNN trained on sklearn's 8x8 digits.

The classifier is `rewardtune.nets.digits.load_digits_classifier()`: trained reproducibly on first use (400 Adam
steps at seed 0 on the first 1,500 digits) and cached. It is frozen and left out of checkpoints (the factory
rebuilds it from the cache). The reward is differentiable: the gradient reaches the pixels.

In a class-conditional run (`[conditions] kind = "labels"`, num_classes = 10) the target of each sample is its own
condition: r(x, c) = log p(c | x), the prompted class's log-probability; `target_class` then applies only to samples
without a condition (label -1) and to calls without a context.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from rewardtune.nets.digits import load_digits_classifier
from rewardtune.rewards.base import Reward, keep_out_of_checkpoints

__all__ = ["DigitsClassifierReward", "build_digits_classifier_reward"]


class DigitsClassifierReward(Reward):
    """r(x, c) = log_softmax(classifier(x))[target]: [B], for images [B, 1, 8, 8] in [-1, 1]; the target is each
    sample's class label c when the context holds labels, else `target_class`."""

    name: ClassVar[str] = "digits_classifier"
    differentiable: ClassVar[bool] = True
    learns: ClassVar[bool] = False

    def __init__(self, classifier: nn.Module, target_class: int | None) -> None:
        super().__init__()
        if target_class is not None and not 0 <= target_class <= 9:
            raise ValueError(f"target_class must be in 0..9, got {target_class}")
        self.classifier = classifier.eval().requires_grad_(False)
        keep_out_of_checkpoints(self, "classifier")
        self.target_class = target_class

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        if tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"digits_classifier needs images B x 1 x 8 x 8, got shape {tuple(x.shape)}")
        log_probs = torch.log_softmax(self.classifier(x.float()), dim=1)  # [B, 10]
        return log_probs.gather(1, self.targets(x, context).view(-1, 1)).view(-1)

    def targets(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """The class each sample is scored for: its condition's label (0..9), or `target_class`: int64 [B]."""
        labels = getattr(context, "labels", None)
        if self.target_class is None and (labels is None or bool((labels < 0).any())):
            raise ValueError("digits_classifier without target_class scores only samples with a class condition")
        target = torch.full((x.shape[0],), self.target_class or 0, dtype=torch.long, device=x.device)
        if labels is None:
            return target
        labels = labels.to(x.device)
        if bool(((labels < -1) | (labels > 9)).any()):
            raise ValueError(f"digits_classifier scores labels 0..9 (or -1: none), got {labels.tolist()[:8]}")
        return torch.where(labels >= 0, labels, target)

    @torch.no_grad()
    def evaluation_metrics(self, x: torch.Tensor, context=None) -> dict[str, float]:
        """Extra evaluation metrics: the fraction of samples the classifier assigns to their target class."""
        predicted = self.classifier(x.float()).argmax(dim=1)
        return {"target_class_fraction": float((predicted == self.targets(x, context)).float().mean())}


def build_digits_classifier_reward(
    sample_shape: tuple[int, ...], conditioning=None, /, *, target_class: int | None = None
) -> DigitsClassifierReward:
    """Reward `digits_classifier`: log-probability of `target_class` (0..9), or in a class-conditional run of each
    sample's own class, under the cached digits classifier (`target_class` is needed unless the run is
    class-conditional)."""
    if tuple(sample_shape) != (1, 8, 8):
        raise ValueError(f"reward 'digits_classifier' needs 1x8x8 digits, got sample shape {tuple(sample_shape)}")
    if target_class is None and getattr(conditioning, "num_classes", None) != 10:
        raise ValueError("needs target_class (0..9) unless the run is conditioned on the 10 digit classes")
    return DigitsClassifierReward(load_digits_classifier(), target_class)
