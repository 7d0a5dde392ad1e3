"""Rewards for the conditional tests: one that records the context it is given, and one whose `forward` takes no
context at all (written before conditions existed).

Use from a recipe as `[reward] kind = "recording_rewards:build_recording_reward"`; `CALLS` holds, per call, the
labels of the context (None when the reward got none) and whether gradients were enabled.
"""

from __future__ import annotations

import torch

from rewardtune.rewards.base import Reward

CALLS: list[dict] = []


class RecordingReward(Reward):
    """r(x, c) = -||x - centre(c)||^2 / 2 with centre(c) = (c, 0) (and (0, 0) without a context); records contexts."""

    name = "recording"
    differentiable = True

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        labels = None if context is None else context.labels.detach().cpu().clone()
        CALLS.append({"labels": labels, "batch": x.shape[0]})
        centre = torch.zeros_like(x.flatten(1))
        if labels is not None:
            centre[:, 0] = labels.to(x.device, x.dtype)
        return -0.5 * (x.flatten(1) - centre).pow(2).sum(1)


class ContextFreeReward(Reward):
    """r(x) = -||x||^2 / 2, with a `forward` that takes no context (a plugin written before conditions)."""

    name = "context_free"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * x.flatten(1).pow(2).sum(1)


def build_recording_reward() -> RecordingReward:
    return RecordingReward()


def build_context_free_reward() -> ContextFreeReward:
    return ContextFreeReward()


def build_plain_value(sample_shape: tuple[int, ...], /):
    """A value plugin that takes no condition (its factory has no `conditioning` parameter)."""
    from rewardtune.nets.value import build_time_mlp_value

    return build_time_mlp_value(sample_shape, hidden=16, depth=2, time_dim=16)


def build_unconditional_algorithm(backbone, /):
    """An algorithm plugin that does not declare `conditional = True` (DDPM pretraining that ignores conditions)."""
    from rewardtune.algorithms.ddpm import DDPMPretrain

    class Unconditional(DDPMPretrain):
        conditional = False

    return Unconditional(backbone)


def build_plain_energy(sample_shape: tuple[int, ...], value, num_steps: int, /):
    """A learning reward plugin that takes no condition (an unconditional energy E(x))."""
    from rewardtune.rewards.energy import build_energy_reward

    return build_energy_reward(sample_shape, value, num_steps, share_with_value=False, hidden=16, depth=2)
