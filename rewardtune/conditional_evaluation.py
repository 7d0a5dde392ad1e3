"""Evaluating a conditional sampler: which conditions are sampled, and the metrics per condition and pooled.

Evaluation samples every condition of the source's training split equally often (`evaluation_conditions`), so the
pooled metrics weigh conditions alike and each condition gets its own. Held-out prompts (a source with a held-out
split) are sampled the same way and reported under "held_out/". Per-condition metrics are flat keys
"<metric>/<condition>" (e.g. "class_accuracy/class 3"), so eval.json, keep-best and the reports take them as they
take any metric.

- `class_accuracy`: the fraction of samples that a classifier of the data (`classify(x) -> labels`: the 8 Gaussians'
  nearest component, the digits classifier behind the "digits" feature extractor) puts in the conditioned class;
- the reward's mean and its own `evaluation_metrics`, given each sample's condition as context;
- `diversity` (images): the mean pairwise feature distance between samples of the same condition, averaged over
  conditions; a sampler that collapses onto one image per prompt scores 0 however good that image is.
"""

from __future__ import annotations

import math

import torch

from rewardtune.conditions import Conditions
from rewardtune.rewards.base import (
    Reward,
    check_reward_output,
    reward_input,
    reward_name,
)

REWARD_SAMPLES = 2000  # samples whose mean reward is `reward_mean`
SPLITS = (("train", ""), ("held_out", "held_out/"))  # evaluated splits and their metric prefixes


def per_condition_count(num_samples: int, conditions) -> int:
    """How many samples each training condition gets so that all of them together give at least `num_samples` (a
    balanced source then redistributes that total over its groups: `PromptSource.evaluation_counts`)."""
    keys = len(conditions.source.train_keys)
    return max(1, math.ceil(num_samples / max(keys, 1)))


def evaluated_splits(conditions) -> list[tuple[str, str]]:
    """(split, metric prefix) of the splits to evaluate: "train", and "held_out" when the source holds prompts out."""
    held_out = getattr(conditions.source, "held_out_keys", None) or ()
    return [split for split in SPLITS if split[0] == "train" or len(held_out) > 0]


def class_accuracy(predicted: torch.Tensor, condition: Conditions) -> dict[str, float]:
    """`class_accuracy` (pooled) and `class_accuracy/<key>` per class, of predicted labels [N] against the
    conditioned ones."""
    labels = condition.labels.cpu()
    hit = (predicted.cpu() == labels).double()
    metrics = {"class_accuracy": float(hit.mean())}
    for k in labels.unique().tolist():
        metrics[f"class_accuracy/class {k}"] = float(hit[labels == k].mean())
    return metrics


@torch.no_grad()
def conditional_reward_metrics(reward: Reward, samples: torch.Tensor, condition: Conditions) -> dict[str, float]:
    """`reward_mean` of the first REWARD_SAMPLES samples [N, ...] under their conditions (not for a learning reward,
    whose value moves with it), and the reward's own `evaluation_metrics(samples, context)`."""
    metrics = {}
    if not reward.learns:
        n = min(REWARD_SAMPLES, samples.shape[0])
        head, context = samples[:n], condition.select(list(range(n)))
        rewards = -check_reward_output(reward_name(reward), reward.cost(head, context), n)
        metrics["reward_mean"] = float(rewards.mean())
    return metrics | reward_evaluation_metrics(reward, samples, condition)


def reward_evaluation_metrics(reward: Reward, samples: torch.Tensor, condition: Conditions | None) -> dict[str, float]:
    """`reward.evaluation_metrics(samples)`, with the conditions as `context` when there are any (a reward written
    before conditions existed takes only the samples)."""
    import inspect

    takes_context = "context" in inspect.signature(reward.evaluation_metrics).parameters
    samples = reward_input(reward, samples)  # in the reward's declared image range
    if condition is None or not takes_context:
        return reward.evaluation_metrics(samples)
    return reward.evaluation_metrics(samples, context=condition)


def within_condition_diversity(features: torch.Tensor, keys: list[str]) -> float:
    """Mean over conditions of the mean pairwise Euclidean distance between the features [N, F] of the samples that
    share a condition (`keys`, one per row); conditions with a single sample are skipped (NaN if none has two)."""
    groups: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    means = []
    for rows in groups.values():
        if len(rows) > 1:
            f = features[rows].double()
            d = torch.cdist(f, f)
            means.append(float(d.sum() / (len(rows) * (len(rows) - 1))))
    return sum(means) / len(means) if means else float("nan")


def reward_metrics_by_split(reward: Reward, conditions, condition: Conditions, samples: torch.Tensor, per: int,
                           draw, device) -> dict[str, float]:
    """The reward's metrics (`conditional_reward_metrics`) under the training conditions `condition`, whose
    `samples` are drawn already, and, prefixed "held_out/", under the held-out ones (`per` samples each, drawn
    with `draw(condition) -> samples`) when the source holds any out."""
    metrics: dict[str, float] = {}
    for split, prefix in evaluated_splits(conditions):
        c = condition if split == "train" else conditions.evaluation_conditions(split, per, device)
        x = samples if split == "train" else draw(c)
        metrics.update(prefixed(conditional_reward_metrics(reward, x.to(device), c), prefix))
    return metrics


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items()}
