"""Reward `teacher`: the reward a [distill] recipe's teacher was tuned for, frozen.

For a DxMI teacher this is its learned energy, r(x) = -E(x): the one-step student is then fine-tuned by DxDP at
T = 1 against the energy that defined the teacher, which keeps the student's entropy term (docs/distillation.md).
The wrapped reward never learns here and carries no gradient to its parameters, unless `learn = true`: then the
energy is trained on, against the student's samples, as in DxMI (a frozen energy is only trustworthy where the
teacher's samples went; a student that leaves that region can find spuriously low energy there).
"""

from __future__ import annotations

import torch

from rewardtune.rewards.base import Reward, reward_name
from rewardtune.types import Teacher


class FrozenReward(Reward):
    """`inner`'s scores with its parameters frozen and `learns = False`; differentiable when `inner` is."""

    name = "teacher"
    learns = False

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner.requires_grad_(False).eval()
        self.differentiable = bool(getattr(inner, "differentiable", True))
        self.name = f"teacher ({reward_name(inner)})"

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        return self.inner(x, context)

    def evaluation_metrics(self, x: torch.Tensor) -> dict[str, float]:
        hook = getattr(self.inner, "evaluation_metrics", None)
        return hook(x) if hook is not None else {}

    def train(self, mode: bool = True) -> FrozenReward:
        super().train(mode)
        self.inner.eval()  # frozen: stays in evaluation mode
        return self


def build_teacher_reward(teacher: Teacher, /, *, learn: bool = False) -> torch.nn.Module:
    """Reward `teacher`: the [distill] teacher's own reward (a DxMI teacher's learned energy), frozen; with
    `learn = true` the energy goes on learning against the student's samples (DxMI at T = 1 started from it)."""
    if teacher is None:
        raise ValueError("reward 'teacher' needs a [distill] table naming the teacher")
    if teacher.reward is None:
        raise ValueError(f"reward 'teacher': the teacher {teacher.run_dir} has no reward (a pretraining run?)")
    if learn:
        if not getattr(teacher.reward, "learns", False):
            raise ValueError("reward 'teacher': learn = true needs a teacher whose reward learns (a DxMI energy)")
        return teacher.reward.requires_grad_(True).train()
    return FrozenReward(teacher.reward)
