"""Reward `digits_classifier`: r(x) = log p(target_class | x) under a small CNN trained on sklearn's 8x8 digits.

The classifier is `rewardtune.nets.digits.load_digits_classifier()`: trained reproducibly on first use (400 Adam
steps at seed 0 on the first 1,500 digits) and cached. It is frozen and left out of checkpoints (the factory
rebuilds it from the cache). The reward is differentiable: the gradient reaches the pixels.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from rewardtune.nets.digits import load_digits_classifier
from rewardtune.rewards.base import Reward, keep_out_of_checkpoints

__all__ = ["DigitsClassifierReward", "build_digits_classifier_reward"]


class DigitsClassifierReward(Reward):
    """r(x) = log_softmax(classifier(x))[target_class]: [B], for images [B, 1, 8, 8] in [-1, 1]."""

    name: ClassVar[str] = "digits_classifier"
    differentiable: ClassVar[bool] = True
    learns: ClassVar[bool] = False

    def __init__(self, classifier: nn.Module, target_class: int) -> None:
        super().__init__()
        if not 0 <= target_class <= 9:
            raise ValueError(f"target_class must be in 0..9, got {target_class}")
        self.classifier = classifier.eval().requires_grad_(False)
        keep_out_of_checkpoints(self, "classifier")
        self.target_class = target_class

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        if tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"digits_classifier needs images B x 1 x 8 x 8, got shape {tuple(x.shape)}")
        log_probs = torch.log_softmax(self.classifier(x.float()), dim=1)  # [B, 10]
        return log_probs[:, self.target_class]

    @torch.no_grad()
    def evaluation_metrics(self, x: torch.Tensor) -> dict[str, float]:
        """Extra evaluation metrics: the fraction of samples the classifier assigns to the target class."""
        predicted = self.classifier(x.float()).argmax(dim=1)
        return {"target_class_fraction": float((predicted == self.target_class).float().mean())}


def build_digits_classifier_reward(sample_shape: tuple[int, ...], /, *, target_class: int) -> DigitsClassifierReward:
    """Reward `digits_classifier`: log-probability of `target_class` (0..9) under the cached digits classifier."""
    if tuple(sample_shape) != (1, 8, 8):
        raise ValueError(f"reward 'digits_classifier' needs 1x8x8 digits, got sample shape {tuple(sample_shape)}")
    return DigitsClassifierReward(load_digits_classifier(), target_class)
