"""The image evaluator's reference set: the Fréchet distance uses all of it, precision/recall a fixed uniformly random
subset of it (at most PR_MAX_FEATURES), never the data's first rows."""

from __future__ import annotations

import pytest
import torch
from helpers import LinearPolicy

from rewardtune import image_evaluation
from rewardtune.image_evaluation import ImageEvaluator, fixed_subset
from rewardtune.metrics.fid import frechet_distance
from rewardtune.metrics.precision_recall import precision_recall


class SortedImages:
    """120 images sorted by class, as a folder sorted by class would load: 60 near -0.5, then 60 near +0.5."""

    sample_shape = (1, 2, 2)

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        centres = torch.cat([torch.full((60, 1, 1, 1), -0.5), torch.full((60, 1, 1, 1), 0.5)])
        self.images = centres + 0.1 * torch.randn(120, 1, 2, 2, generator=gen)


def second_class_policy() -> LinearPolicy:
    """Samples like the second class only: x = 0.5 + 0.1 z."""
    return LinearPolicy((1, 2, 2), torch.zeros(1), torch.full((1, 4), 0.5), torch.tensor([0.1]), output_range=(-1.0, 1.0))


def evaluator() -> ImageEvaluator:
    return ImageEvaluator(SortedImages(), num_samples=200, _extractor=torch.nn.Flatten())


def test_fixed_subset_is_uniform_fixed_and_all_rows_when_small():
    rows = torch.arange(1000).view(-1, 1)
    subset = fixed_subset(rows, 100)
    assert torch.equal(subset, fixed_subset(rows, 100))  # the same rows every time
    assert subset.unique().numel() == 100  # without replacement
    assert subset.max() > 500  # not the first rows
    assert torch.equal(fixed_subset(rows, 1000), rows) and torch.equal(fixed_subset(rows, 5000), rows)


def test_precision_recall_use_a_random_subset_of_the_fd_reference(monkeypatch):
    """With more reference features than PR_MAX_FEATURES (here 50 of 120), precision/recall draw their reference
    uniformly from the whole set that FD uses. The first 50 rows would all be of the first class: samples of the
    second class would get precision 0."""
    monkeypatch.setattr(image_evaluation, "PR_MAX_FEATURES", 50)
    ev = evaluator()
    metrics = ev.evaluate(second_class_policy(), None, seed=0)
    reference = ev.reference()
    pr_reference = ev.precision_recall_reference()
    assert reference.shape[0] == 120 and pr_reference.shape[0] == 50
    assert (pr_reference.mean(1) > 0).float().mean() == pytest.approx(0.5, abs=0.2)  # both classes, about evenly
    fake = ev.features(ev.draw(second_class_policy(), 200, torch.Generator().manual_seed(1)))
    assert metrics["frechet_distance"] == pytest.approx(frechet_distance(reference, fake))
    assert (metrics["precision"], metrics["recall"]) == precision_recall(pr_reference, fake[:50])
    assert metrics["precision"] > 0.5  # the first-50-rows reference gives 0:
    assert precision_recall(reference[:50], fake[:50])[0] == 0.0


def test_reference_at_most_pr_max_is_used_whole():
    ev = evaluator()
    ev.evaluate(second_class_policy(), None, seed=0)
    assert torch.equal(ev.precision_recall_reference(), ev.reference())
