"""The density-ratio discriminator's losses on exact diffused mixtures: both are optimal at the exact log-ratio, and
J_MSE differs from the ideal J_SM by a constant (the thesis's Prop. 1), by Monte Carlo with common random numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rewardtune.score_sde.discriminator import (
    TimeDiscriminator,
    discriminator_loss,
    dsm_residual_loss,
)
from rewardtune.score_sde.gmm import DiffusedGMM, log_ratio
from rewardtune.score_sde.sdes import make_sde

SDE = make_sde("subvp")
P = DiffusedGMM(torch.tensor([0.5, 0.5]), torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), torch.tensor([0.2, 0.1]), SDE)
Q = DiffusedGMM(torch.tensor([0.8, 0.2]), torch.tensor([[1.1, 0.0], [-1.0, 0.4]]), torch.tensor([0.25, 0.1]), SDE)


class ScaledExactRatio(TimeDiscriminator):
    """d(x, t) = a log(p_t / q_t)(x): the exact log-ratio at a = 1."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.a = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.a * log_ratio(P, Q, x, t)


def grad_of_loss_in_a(kind: str, n: int, seed: int) -> float:
    disc = ScaledExactRatio()
    gen = torch.Generator().manual_seed(seed)
    loss = discriminator_loss(kind, disc, Q.score, SDE, P.sample(n, 0.0, gen), Q.sample(n, 0.0, gen), gen, t_min=0.05)
    (grad,) = torch.autograd.grad(loss, disc.a)
    return float(grad)


@pytest.mark.parametrize("kind", ["bce", "dsm_residual"])
def test_both_losses_are_stationary_at_the_exact_log_ratio(kind):
    at_optimum = grad_of_loss_in_a(kind, 20000, 0)
    disc = ScaledExactRatio()  # away from it (a = 2) the gradient is clearly non-zero and points back
    with torch.no_grad():
        disc.a.fill_(2.0)
    gen = torch.Generator().manual_seed(0)
    loss = discriminator_loss(kind, disc, Q.score, SDE, P.sample(20000, 0.0, gen), Q.sample(20000, 0.0, gen), gen,
                              t_min=0.05)
    (away,) = torch.autograd.grad(loss, disc.a)
    assert float(away) > 0.05 and abs(at_optimum) < 0.1 * float(away), (at_optimum, float(away))


def ideal_score_matching(disc, x0, t, noise) -> torch.Tensor:
    """J_SM at the same diffused points: mean sigma_t^2 ||grad log p_t - s_q - grad d||^2."""
    x_t = SDE.alpha(t)[:, None] * x0 + SDE.sigma(t)[:, None] * noise
    residual = P.score(x_t, t) - Q.score(x_t, t) - disc.input_gradient(x_t, t)
    return (SDE.sigma(t) ** 2 * residual.pow(2).sum(1)).mean()


def test_j_mse_is_j_sm_plus_a_constant():
    gen = torch.Generator().manual_seed(1)
    n = 100000
    x0 = P.sample(n, 0.0, gen)
    t = 0.05 + 0.95 * torch.rand(n, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    gaps = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        disc = TimeDiscriminator(2, hidden=16, depth=2).double()
        j_mse = dsm_residual_loss(disc, Q.score, SDE, x0, t, noise)
        gaps.append((j_mse - ideal_score_matching(disc, x0, t, noise)).item())
    constant = sum(gaps) / 3
    assert constant > 0.1  # the denoising target's own variance
    assert max(abs(g - constant) for g in gaps) < 1e-3 * constant, gaps  # measured: agree to 2e-5


def test_an_unknown_loss_is_a_value_error():
    disc = TimeDiscriminator(2).double()
    with pytest.raises(ValueError, match="unknown discriminator loss"):
        discriminator_loss("wgan", disc, Q.score, SDE, torch.zeros(2, 2, dtype=torch.float64),
                           torch.zeros(2, 2, dtype=torch.float64), None)
