"""The reward contract.

A reward scores final samples x_T: `reward(x, context) -> Tensor[B]`, higher is better. Rewards say whether they are
`differentiable` (policy improvement may back-propagate through them) and whether they `learns` (they are trained
against the sampler, like DxMI's energy; such a reward implements `update(real, fake) -> metrics`).
The cost seen by the control problem (the DxMI paper's terminal cost E(x_T), Eq. (8)) is `-reward`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class Reward(nn.Module):
    """Base class for rewards. Subclasses implement `forward(x, context=None) -> Tensor[B]`."""

    differentiable: ClassVar[bool] = True
    learns: ClassVar[bool] = False

    def cost(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """The terminal cost -r(x): [B]."""
        return -self(x, context)

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        """One training step of a learning reward (data `real` vs sampler output `fake`)."""
        raise NotImplementedError(f"{type(self).__name__} does not learn")

    def optimizers(self) -> list:
        """The `GradStep`s this reward owns (for checkpoints and learning-rate schedules)."""
        return []
