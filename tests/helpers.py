"""Small, exactly solvable building blocks for the tests.

- `LinearPolicy`: a `GaussianChainPolicy` with mean(x, t) = a[t] * x + b[t] (a scalar per step, b an event-shaped
  offset per step); a, b are buffers, or parameters with `learn_mean=True`.
- `QuadraticValueNet`: V(x, t) = alpha_t ||x||^2 + beta_t . x + gamma_t with one set of coefficients per integer t.
- `QuadraticCost`: a fixed (non-learning) reward r(x) = -||x - m||^2 / 2, i.e. terminal cost E(x) = ||x - m||^2 / 2.
- `lqg_objective` / `lqg_optimum`: the DxMI Eq. (8) objective of a linear policy in closed form, and the optimal
  policy and objective value of the linear-quadratic-Gaussian problem by a backward (soft-Riccati) recursion.
- `run_cli`: the command line in this process, with its exit code and output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rewardtune.backbones.base import GaussianChainPolicy
from rewardtune.rewards.base import Reward


class LinearPolicy(GaussianChainPolicy):
    """mean(x_t, t) = a[t] * x_t + b[t]; a: [T], b: [T, *sample_shape]."""

    def __init__(
        self,
        sample_shape: tuple[int, ...],
        a: torch.Tensor,
        b: torch.Tensor,
        sigma: torch.Tensor,
        *,
        learn_mean: bool = False,
        **policy_kwargs,
    ) -> None:
        super().__init__(sample_shape, sigma, **policy_kwargs)
        a = torch.as_tensor(a, dtype=torch.float32).clone()
        b = torch.as_tensor(b, dtype=torch.float32).clone().reshape(a.shape[0], *self.sample_shape)
        if learn_mean:
            self.a = nn.Parameter(a)
            self.b = nn.Parameter(b)
        else:
            self.register_buffer("a", a)
            self.register_buffer("b", b)

    def mean(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        view = (-1, *([1] * len(self.sample_shape)))
        return self.a[t].view(view) * x + self.b[t]


class QuadraticValueNet(nn.Module):
    """V(x, t) = alpha[t] ||x||^2 + beta[t] . x + gamma[t] for t in 0..num_times-1 (t given as a float tensor [B])."""

    def __init__(
        self,
        dim: int,
        num_times: int,
        *,
        alpha: torch.Tensor | float = 0.0,
        beta: torch.Tensor | float = 0.0,
        gamma: torch.Tensor | float = 0.0,
    ) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(num_times) + torch.as_tensor(alpha, dtype=torch.float32))
        self.beta = nn.Parameter(torch.zeros(num_times, dim) + torch.as_tensor(beta, dtype=torch.float32))
        self.gamma = nn.Parameter(torch.zeros(num_times) + torch.as_tensor(gamma, dtype=torch.float32))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype.is_floating_point, "ValueFunction passes t as a float tensor"
        i = t.round().long()
        x = x.flatten(1)
        return self.alpha[i] * x.pow(2).sum(1) + (self.beta[i] * x).sum(1) + self.gamma[i]


class QuadraticCost(Reward):
    """A fixed reward r(x) = -||x - m||^2 / 2 (terminal cost E(x) = ||x - m||^2 / 2)."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", torch.as_tensor(target, dtype=torch.float32).clone())

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        return -0.5 * (x - self.target).flatten(1).pow(2).sum(1)


def lqg_objective(policy: LinearPolicy, target: torch.Tensor, tau: float, s2: torch.Tensor) -> float:
    """Exact Eq. (8) objective J = E[E(x_T) + tau sum log pi + tau sum ||dx||^2 / (2 s_t^2)] of a LinearPolicy with prior
    N(0, I) and E(x) = ||x - m||^2 / 2, in float64.

    With a scalar a_t the marginal of x_t stays isotropic: x_t ~ N(mu_t, v_t I), mu_{t+1} = a_t mu_t + b_t,
    v_{t+1} = a_t^2 v_t + sigma_t^2. E log pi = -H = -(D log sigma_t + D/2 log(2 pi e)), and
    E||x_{t+1} - x_t||^2 = D((a_t - 1)^2 v_t + sigma_t^2) + ||(a_t - 1) mu_t + b_t||^2.
    """
    with torch.no_grad():
        a = policy.a.double()
        b = policy.b.double().flatten(1)
        sigma = policy.sigma().double()
        s2 = s2.double()
        m = torch.as_tensor(target, dtype=torch.float64).flatten()
        d = policy.event_dim
        mu, v = torch.zeros(d, dtype=torch.float64), 1.0
        j = 0.0
        for t in range(policy.num_steps):
            entropy = d * sigma[t].log() + 0.5 * d * math.log(2 * math.pi * math.e)
            sq_step = d * ((a[t] - 1) ** 2 * v + sigma[t] ** 2) + ((a[t] - 1) * mu + b[t]).pow(2).sum()
            j = j - tau * entropy + tau * sq_step / (2 * s2[t])
            mu, v = a[t] * mu + b[t], a[t] ** 2 * v + sigma[t] ** 2
        j = j + 0.5 * (d * v + (mu - m).pow(2).sum())
        return float(j)


def lqg_optimum(
    target: torch.Tensor, tau: float, s2: torch.Tensor, dim: int
) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimal (J*, a*, b*, sigma*) of Eq. (8) over ALL Markov Gaussian policies, by the soft Bellman recursion.

    With V_{t+1}(y) = al ||y||^2 + be . y + ga, the optimal pi(y | x) is proportional to
    exp(-(V_{t+1}(y) + tau ||y - x||^2 / (2 s^2)) / tau): Gaussian with precision P = 2 al / tau + 1 / s^2 (per dim),
    mean (x / s^2 - be / tau) / P, and V_t(x) = -tau log of its normaliser:
        al_t = tau / (2 s^2) - tau / (2 s^4 P),  be_t = be / (s^2 P),
        ga_t = ga - ||be||^2 / (2 tau P) - tau D / 2 log(2 pi / P).
    J* = E_{x_0 ~ N(0, I)} V_0(x_0) = al_0 D + ga_0. The optimal mean is linear with a scalar slope, so a
    LinearPolicy can represent it exactly.
    """
    s2 = s2.double()
    m = torch.as_tensor(target, dtype=torch.float64).flatten()
    T = s2.shape[0]
    al, be, ga = 0.5, -m, 0.5 * float(m.pow(2).sum())
    a, b, sigma = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dim, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        s = float(s2[t])
        P = 2 * al / tau + 1 / s
        a[t], b[t], sigma[t] = 1 / (s * P), -be / (tau * P), P ** -0.5
        al, be, ga = (
            tau / (2 * s) - tau / (2 * s * s * P),
            be / (s * P),
            ga - float(be.pow(2).sum()) / (2 * tau * P) - tau * dim / 2 * math.log(2 * math.pi / P),
        )
    return al * dim + ga, a, b, sigma


class TinyFeatures(torch.nn.Module):
    """A fixed random conv feature extractor for offline FID in tests (images in [-1, 1] -> [B, 16])."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.randn(16, 3, 3, 3, generator=gen)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return torch.nn.functional.conv2d(x, self.weight, padding=1).relu().mean(dim=(2, 3))


def tiny_features() -> TinyFeatures:
    return TinyFeatures()


class TinyEDMNetwork(nn.Module):
    """F(x, c_noise[, class_labels]) for EDM recipes in tests: one 3x3 convolution plus a learned per-noise-level
    shift, and a per-class shift (up to 16 classes; label -1: none) when given labels."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.shift = nn.Linear(1, channels)
        self.classes = nn.Embedding(17, channels)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x) + self.shift(c_noise.view(-1, 1).to(x.dtype))[:, :, None, None]
        if class_labels is not None:
            out = out + self.classes(class_labels.clamp_min(-1) + 1)[:, :, None, None]
        return out


def tiny_edm_network() -> TinyEDMNetwork:
    torch.manual_seed(0)
    return TinyEDMNetwork()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`rewardtune ARGS` in this process, through the console script's error handler (`cli.main`): (exit code,
    stdout, stderr). Arguments may be paths."""
    import sys

    from rewardtune.cli import main

    old = sys.argv
    sys.argv = ["rewardtune", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err
