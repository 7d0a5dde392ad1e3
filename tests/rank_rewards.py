"""A reward plugin whose output or failure depends on the process's rank, for the multi-process agreement tests.

Use it from a recipe as `[reward] kind = "rank_rewards:build_rank_reward"` (a subprocess needs PYTHONPATH=tests).
The reward is r(x) = -mean(x^2) [B]. On the process of rank `rank` (another rank behaves normally), `mode`:

- "noisy_eval": evaluation call number n (no gradient) adds -10 n there and +10 n on every other rank, so with
  `keep_best = "reward_mean"` each other rank finds every evaluation better and that rank none after its first;
- "raise": the training call (with gradient) number `at` raises RuntimeError;
- "nan": training calls from number `at` on return NaN;
- "raise_eval": the evaluation call number `at` raises RuntimeError;
- "nan_metric": the reward learns (it trains nothing), and its update number `at` reports a NaN metric.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rewardtune.rewards.base import Reward

MODES = ("noisy_eval", "raise", "nan", "raise_eval", "nan_metric")


def process_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class RankReward(Reward):
    name = "rank"
    differentiable = True

    def __init__(self, mode: str, rank: int, at: int) -> None:
        super().__init__()
        self.mode, self.rank, self.at = mode, rank, at
        self.learns = mode == "nan_metric"  # an instance flag shadows the class default
        self.train_calls = self.eval_calls = self.updates = 0

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        r = -x.flatten(1).pow(2).mean(1)  # [B]
        here = process_rank() == self.rank
        if torch.is_grad_enabled():
            self.train_calls += 1
            if here and self.mode == "raise" and self.train_calls == self.at:
                raise RuntimeError(f"rank reward failed on training call {self.train_calls}")
            if here and self.mode == "nan" and self.train_calls >= self.at:
                return r * float("nan")
            return r
        self.eval_calls += 1
        if here and self.mode == "raise_eval" and self.eval_calls == self.at:
            raise RuntimeError(f"rank reward failed on evaluation call {self.eval_calls}")
        if self.mode == "noisy_eval":
            return r + (-10.0 if here else 10.0) * self.eval_calls
        return r

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        self.updates += 1
        bad = process_rank() == self.rank and self.updates == self.at
        return {"rank/fake_reward": float("nan") if bad else float(self(fake).mean())}


def build_rank_reward(sample_shape: tuple[int, ...], /, *, mode: str, rank: int = 1, at: int = 1) -> RankReward:
    """Reward `rank_rewards:build_rank_reward`: -mean(x^2), misbehaving on process `rank` as `mode` says."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return RankReward(mode, rank, at)
