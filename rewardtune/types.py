"""Shared data types and the one time convention of the toolkit.

Time convention (the DxMI paper's, Eq. (1)): sampler time t = 0 is noise x_0 ~ pi(x_0) and t = T is the sample x_T.
A T-step policy has T transitions x_t -> x_{t+1}, t = 0..T-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rewardtune.conditions import Conditions


@dataclass(frozen=True)
class Trajectory:
    """A batch of sampled chains x_0..x_T.

    Attributes:
        states: [T+1, B, *event_shape], states[t] = x_t (states[0] is the prior draw, states[-1] the sample).
        sigmas: [T], the noise level sigma_t used by each transition.
        log_probs: [T, B], log pi(x_{t+1} | x_t, c) of each sampled transition (summed over dimensions); None when
            the states were altered after the draw (value guidance).
        condition: the condition c of each chain (B rows), or None for an unconditional sampler.
    """

    states: torch.Tensor
    sigmas: torch.Tensor
    log_probs: torch.Tensor | None = None
    condition: Conditions | None = None

    @property
    def num_steps(self) -> int:
        return self.states.shape[0] - 1

    @property
    def batch_size(self) -> int:
        return self.states.shape[1]

    @property
    def final(self) -> torch.Tensor:
        """x_T, the samples: [B, *event_shape]."""
        return self.states[-1]

    def transitions(self, t: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs (x_t, x_{t+1}) for per-sample times `t` [N] and batch indices `index` [N]."""
        return self.states[t, index], self.states[t + 1, index]


@dataclass(frozen=True)
class Teacher:
    """A trained sampler and the reward it was tuned for, frozen: the teacher of a [distill] recipe.

    Attributes:
        backbone: the T-step policy (its EMA weights when the run kept an EMA).
        reward: the run's reward (for DxMI, the learned energy), or None for a pretraining-only run.
        run_dir: where it was loaded from.
    """

    backbone: torch.nn.Module
    reward: torch.nn.Module | None
    run_dir: str
