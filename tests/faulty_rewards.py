"""A reward plugin that breaks its contract on request, for the bad-input and crash tests.

Use it from a recipe as `[reward] kind = "faulty_rewards:build_faulty_reward"` with `mode` and `after`: the first
`after` calls return a good reward, later calls return what `mode` names. The tests' folder is on sys.path under
pytest; a subprocess needs PYTHONPATH=tests.
"""

from __future__ import annotations

import torch

from rewardtune.rewards.base import Reward

MODES = ("ok", "shape", "nan", "inf", "list")


class FaultyReward(Reward):
    name = "faulty"
    differentiable = True
    learns = False

    def __init__(self, mode: str, after: int) -> None:
        super().__init__()
        self.mode, self.after, self.calls = mode, after, 0

    def forward(self, x: torch.Tensor, context=None):
        self.calls += 1
        r = -(x.flatten(1).norm(dim=1) - 2.0).abs()  # [B]: a ring of radius 2
        if self.calls <= self.after or self.mode == "ok":
            return r
        if self.mode == "shape":
            return r[:, None]
        if self.mode == "nan":
            return r * float("nan")
        if self.mode == "inf":
            return r.clone().fill_(float("inf"))
        return r.tolist()  # "list"


def build_faulty_reward(sample_shape: tuple[int, ...], /, *, mode: str = "ok", after: int = 0) -> FaultyReward:
    """Reward `faulty_rewards:build_faulty_reward`: good for `after` calls, then broken as `mode` says."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return FaultyReward(mode, after)
