"""Reward `composite`: a weighted sum of rewards, each term optionally standardised by running statistics.

    r(x) = sum_k w_k z_k(x),   z_k = r_k(x)                               (normalize = false)
                               z_k = (r_k(x) - m_k) / sqrt(v_k + eps)       (normalize = true)

m_k, v_k are exponential moving averages of each term's batch mean and variance (rate `momentum`; the first batch
sets them), kept in buffers so checkpoints and resume cover them. Like batch norm, they are updated by forward
calls in training mode with gradients enabled and frozen under `torch.no_grad()` or `.eval()` (evaluation). The
algorithms score each iteration's sampled x_T once that way (DxDP's terminal cost, the policy gradient's terminal
reward), so the statistics move once per iteration; DxDP's policy loss with `terminal = "reward"` re-scores its
rows in evaluation mode (`modes.eval_mode`), with gradients but without a second update. They are treated as
constants by the gradient. With several processes the batch statistics are those of all processes' samples
together (sums averaged with `optim.all_mean`), so every rank keeps the same m_k, v_k and normalises alike.

The composite is differentiable iff every term is, and learns iff some term does; `update` then trains the learning
terms (its metrics include `last_terms`). `last_terms` holds {"reward/<name>": mean raw reward of the last batch}
for logging. In a recipe the terms are nested reward tables, each checked against its own factory, with a `weight`
(default 1) and a `name` (default: its kind):

    [reward]
    kind = "composite"
    normalize = true

    [[reward.terms]]
    kind = "clip"
    prompts = ["a photo of a cat"]

    [[reward.terms]]
    kind = "jpeg"
    weight = 0.5
"""

from __future__ import annotations

import functools
import re
from typing import ClassVar

import torch
from torch import nn

from rewardtune.nets.conditioning import Conditioning
from rewardtune.optim import all_mean
from rewardtune.rewards.base import (
    Reward,
    call_reward,
    check_reward_output,
    reward_shares_value,
)
from rewardtune.tables import PluginTable


class RewardTerm(PluginTable):
    """One term of a composite in a recipe: a reward table plus `weight` and an optional `name`."""

    section: ClassVar[str] = "reward"
    extra_keys: ClassVar[dict[str, type]] = {"weight": float, "name": str}
    extra_defaults: ClassVar[dict[str, float]] = {"weight": 1.0}


class CompositeReward(Reward):
    """sum_k w_k z_k(x), z_k the term's reward (standardised with `normalize`).

    Args:
        terms: {name: (reward, weight)}; names are lowercase snake_case.
        normalize: standardise each term with running mean/variance before weighting.
        momentum: the moving-average rate of those statistics, in (0, 1].
        eps: added to the variance.
    """

    name: ClassVar[str] = "composite"

    def __init__(
        self, terms: dict[str, tuple[Reward, float]], *, normalize: bool = False, momentum: float = 0.01, eps: float = 1e-8
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("composite needs at least one term")
        if not 0 < momentum <= 1:
            raise ValueError(f"composite momentum must be in (0, 1], got {momentum}")
        for term_name in terms:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", term_name):
                raise ValueError(f"composite term names are lowercase snake_case, got {term_name!r}")
        self.terms = nn.ModuleDict({n: reward for n, (reward, _) in terms.items()})
        # the weights come from the recipe, not from checkpoints
        self.register_buffer("weights", torch.tensor([float(w) for _, w in terms.values()]), persistent=False)  # [K]
        self.normalize, self.momentum, self.eps = normalize, momentum, eps
        # instance flags shadow the class defaults: they depend on the terms
        self.differentiable = all(r.differentiable for r in self.terms.values())
        self.learns = any(r.learns for r in self.terms.values())
        k = len(terms)
        self.register_buffer("running_mean", torch.zeros(k, dtype=torch.float64))  # [K]
        self.register_buffer("running_var", torch.ones(k, dtype=torch.float64))  # [K]
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.last_terms: dict[str, float] = {}

    def term_rewards(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Each term's raw reward, checked against the contract: [K, B]."""
        values = [check_reward_output(n, call_reward(term, x, context), x.shape[0]) for n, term in self.terms.items()]
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in values])
        return torch.stack([v.to(dtype) for v in values])  # [K, B]

    @torch.no_grad()
    def update_statistics(self, values: torch.Tensor) -> None:
        """Fold a batch [K, B] into the running mean/variance (mixture of the old estimate and the batch); with
        several processes the batch is every process's batch together (a collective: call it on every rank)."""
        batch_mean, batch_var = pooled_moments(values.double(), self.running_mean)  # [K], [K]
        if int(self.num_updates) == 0:
            self.running_mean.copy_(batch_mean)
            self.running_var.copy_(batch_var)
        else:
            m = self.momentum
            delta = batch_mean - self.running_mean
            self.running_mean.add_(m * delta)
            self.running_var.copy_((1 - m) * (self.running_var + m * delta.pow(2)) + m * batch_var)
        self.num_updates.add_(1)

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        values = self.term_rewards(x, context)  # [K, B]
        means = values.detach().mean(1).tolist()
        self.last_terms = {f"reward/{n}": v for n, v in zip(self.terms, means)}
        if self.normalize:
            if self.training and torch.is_grad_enabled():
                self.update_statistics(values.detach())
            mean = self.running_mean.to(values.dtype)[:, None]  # [K, 1]
            std = (self.running_var + self.eps).sqrt().to(values.dtype)[:, None]  # [K, 1]
            values = (values - mean) / std
        return (self.weights.to(values.dtype)[:, None] * values).sum(0)  # [B]

    def evaluation_metrics(self, x: torch.Tensor, context=None) -> dict[str, float]:
        """Every term's own `evaluation_metrics` of `x` (each in the term's image range, with `context` where the term
        takes it), a key prefixed with its term's name when an earlier term reported it: e.g. the shapes verifier's
        accuracies beside a learned energy."""
        from rewardtune.conditional_evaluation import reward_evaluation_metrics

        metrics: dict[str, float] = {}
        for term_name, term in self.terms.items():
            for key, value in reward_evaluation_metrics(term, x, context).items():
                metrics[f"{term_name}/{key}" if key in metrics else key] = value
        return metrics

    @property
    def reports_evaluation_metrics(self) -> bool:
        return any(term.reports_evaluation_metrics for term in self.terms.values())

    def update(
        self, real: torch.Tensor, fake: torch.Tensor, real_condition=None, fake_condition=None
    ) -> dict[str, float]:
        """Train the learning terms on data `real` and samples `fake` (with their conditions in a conditional run:
        both or neither). Returns their metrics (prefixed with the term name on a clash) and `last_terms` (the
        per-term means of the last batch scored, so a trainer that logs `update` metrics logs them too)."""
        conditions = () if real_condition is None and fake_condition is None else (real_condition, fake_condition)
        metrics: dict[str, float] = dict(self.last_terms)
        for term_name, term in self.terms.items():
            if term.learns:
                for key, value in term.update(real, fake, *conditions).items():
                    metrics[f"{term_name}/{key}" if key in metrics else key] = value
        return metrics

    def optimizers(self) -> list:
        found: list = []
        for term in self.terms.values():
            found += [opt for opt in term.optimizers() if all(opt is not o for o in found)]
        return found


def pooled_moments(values: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance [K] of each row of `values` [K, B] pooled over every process's batch.

    One `all_mean` of the per-process count, sum and sum of squares (ratios of means are ratios of sums, so unequal
    batch sizes are weighted correctly; a process may hold no samples). Values are taken relative to `shift` [K]
    (the same on every rank) to keep E[y^2] - E[y]^2 away from cancellation.
    """
    y = values - shift[:, None]  # [K, B]
    count = torch.full_like(shift, float(values.shape[1]))  # [K]
    count, total, total_sq = all_mean(torch.stack([count, y.sum(1), y.pow(2).sum(1)]))  # [K] each
    mean_y = total / count
    return shift + mean_y, (total_sq / count - mean_y.pow(2)).clamp_min(0.0)


def term_names(specs: list[RewardTerm]) -> list[str]:
    """The terms' names: `name`, else the kind (its factory name for a dotted path), numbered when repeated."""
    names: list[str] = []
    for spec in specs:
        base = spec.extra.get("name") or re.sub(r"[^a-z0-9_]", "_", spec.kind.rpartition(":")[2].lower())
        name, i = base, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


def build_composite_reward(
    sample_shape: tuple[int, ...],
    num_steps: int,
    backbone: nn.Module,
    value: nn.Module | None,
    conditioning: Conditioning | None = None,
    /,
    *,
    terms: list[RewardTerm],
    normalize: bool = False,
    momentum: float = 0.01,
) -> CompositeReward:
    """Reward `composite`: the weighted sum of `terms` (nested reward tables with `weight`, `name`).

    In a conditional recipe every term gets the condition as `context`; a learning term (a conditional energy
    E(x, c)) must take it at construction (its factory's `conditioning` parameter), else a ValueError.
    """
    context = {"sample_shape": sample_shape, "num_steps": num_steps, "backbone": backbone, "value": value, "reward": None,
               "conditioning": conditioning}
    built: dict[str, tuple[Reward, float]] = {}
    for term_name, spec in zip(term_names(terms), terms):
        try:
            reward = spec.build(context)
            if not isinstance(reward, Reward):
                raise TypeError(f"returned {type(reward).__name__}, not a Reward (rewardtune.rewards.base.Reward)")
            if conditioning is not None and reward.learns and "conditioning" not in spec.context_names():
                raise ValueError("a learning term of a conditional recipe must take the condition (its factory has "
                                 "no `conditioning` parameter)")
        except (ValueError, TypeError) as err:
            raise ValueError(f"term {term_name!r} (kind {spec.kind!r}): {err}") from None
        if reward_shares_value(reward, value):
            raise ValueError(f"composite term {term_name!r} shares the value network; set share_with_value = false")
        built[term_name] = (reward, spec.extra.get("weight", 1.0))
    return CompositeReward(built, normalize=normalize, momentum=momentum)
