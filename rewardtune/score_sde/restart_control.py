"""f-Restart: a discrete-action sampling controller over a frozen score, trained by f-policy-gradient (the boosting
thesis's Method B, ../shared/papers/004 Sec. 3.2 and its Algorithm 7; f-PG: Agarwal et al. 2023).

The MDP: a state is (x, i), a sample at grid level i of a descending time grid t_0 = 1 > ... > t_N (`time_grid`); the
two actions are **denoise** (one PF-ODE Heun step i -> i + 1 with the frozen score) and **re-noise** (the forward
kernel from t_i back to t_{i-1}, i -> i - 1, as restart sampling re-noises). An episode starts from the prior at
level 0 and takes L >= N actions (`horizon`); what is left of the grid after L actions is finished by Heun steps, so
every episode ends in a sample. f-PG minimises D_f(p_psi || p_*) between the controller's state-visitation
distribution p_psi(x, t) and the expert's p_*(x, t) (data diffused to t): a discriminator d(x, t) (logit of policy
states against expert states at the same times, so d ≈ log p_psi / p_*) gives each visited state the cost
f'(exp d); the policy gradient weights each action's log-probability by the discounted cost-to-go
F_l = sum_{i >= l} gamma^{i - l} f'(exp d(s_i)) (minimised: the advantage is -F, normalised), in PPO's clipped form
(`algorithms/policy_gradient.py: ppo_clip_loss`).

The thesis reports this as a negative result: the controller collapses to always re-noise (at high noise p_psi ≈ p_*,
nothing to learn) or, with a decreasing time weight, to always denoise. `scripts/f_restart.py` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rewardtune.nets.mlp import TimeMLP
from rewardtune.score_sde.sdes import SDE, transition_kernel
from rewardtune.score_sde.solvers import Score, ode_heun

DENOISE, RENOISE = 0, 1


@dataclass
class RestartEnvironment:
    """The MDP of the module docstring over a frozen `score` on the grid `times` [N + 1] (descending)."""

    sde: SDE
    score: Score
    times: torch.Tensor
    horizon: int

    def __post_init__(self) -> None:
        if self.horizon < self.num_levels:
            raise ValueError(f"the horizon ({self.horizon}) must be at least the grid's {self.num_levels} steps")

    @property
    def num_levels(self) -> int:
        """N, the number of denoising steps from t_0 to t_N."""
        return self.times.shape[0] - 1

    def step(self, x: torch.Tensor, level: torch.Tensor, action: torch.Tensor, generator: torch.Generator | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply each row's action [B] (DENOISE or RENOISE) to states x [B, D] at levels [B]; a denoise at level N or
        a re-noise at level 0 leaves the row where it is. Returns (x, level)."""
        x, level = x.clone(), level.clone()
        denoise = (action == DENOISE) & (level < self.num_levels)
        renoise = (action == RENOISE) & (level > 0)
        for i in torch.unique(level[denoise]).tolist():
            rows = denoise & (level == i)
            x[rows] = ode_heun(self.sde, self.score, x[rows], self.times[i : i + 2])
        for i in torch.unique(level[renoise]).tolist():
            rows = renoise & (level == i)
            m, v = transition_kernel(self.sde, self.times[i], self.times[i - 1])
            noise = torch.randn(x[rows].shape, generator=generator, dtype=x.dtype)
            x[rows] = m * x[rows] + v.sqrt() * noise
        return x, level + denoise.long() - renoise.long()

    def finish(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Denoise every row from its level to t_N (the sample of an episode)."""
        x = x.clone()
        for i in torch.unique(level).tolist():
            rows = level == i
            if i < self.num_levels:
                x[rows] = ode_heun(self.sde, self.score, x[rows], self.times[i:])
        return x


class RestartController(nn.Module):
    """pi(a | x, t): logits [B, 2] (denoise, re-noise) from a `TimeMLP` on x and t (t in [0, 1], embedded as a
    DDPM-like timestep 1000 t)."""

    def __init__(self, dim: int, *, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.net = TimeMLP(dim, 2, hidden=hidden, depth=depth, time_dim=32, time_scale=1000.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x.float(), t.float())


@dataclass
class Episodes:
    """L steps of B episodes: states [L, B, D], their times [L, B], actions [L, B], log pi(a | s) [L, B] at sampling,
    and the final samples [B, D]."""

    states: torch.Tensor
    times: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    samples: torch.Tensor


@torch.no_grad()
def roll_out(env: RestartEnvironment, policy: RestartController, n: int, generator: torch.Generator | None,
             greedy: bool = False) -> Episodes:
    """n episodes from the prior N(0, sigma(t_0)^2 I) (VP: N(0, I)), actions sampled from the policy (or its argmax,
    as the thesis's Algorithm 7 prints: `greedy`)."""
    std = env.sde.sigma(env.times[0])
    x = std * torch.randn((n, policy.dim), generator=generator, dtype=torch.float64)
    level = torch.zeros(n, dtype=torch.long)
    states, times, actions, log_probs = [], [], [], []
    for _ in range(env.horizon):
        t = env.times[level]
        logits = policy(x, t)
        if greedy:
            action = logits.argmax(1)
        else:
            action = torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)
        states.append(x)
        times.append(t)
        actions.append(action)
        log_probs.append(torch.log_softmax(logits, 1).gather(1, action[:, None]).squeeze(1))
        x, level = env.step(x, level, action, generator)
    return Episodes(torch.stack(states), torch.stack(times), torch.stack(actions), torch.stack(log_probs),
                    env.finish(x, level))


def costs_to_go(costs: torch.Tensor, discount: float) -> torch.Tensor:
    """F_l = sum_{i >= l} discount^{i - l} costs_i along the first axis of costs [L, B]."""
    out = torch.zeros_like(costs)
    running = torch.zeros_like(costs[0])
    for step in range(costs.shape[0] - 1, -1, -1):
        running = costs[step] + discount * running
        out[step] = running
    return out


def renoise_fraction(episodes: Episodes) -> float:
    """The fraction of actions that re-noise (the thesis's failure modes: near 1 or near 0)."""
    return float((episodes.actions == RENOISE).float().mean())
