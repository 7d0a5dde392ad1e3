"""Closed-form checks of the small pieces every run relies on: the sliced Wasserstein metric, the energy AUC, the EBM
loss (Algorithm 1, line 4), the DDPM pretraining loss and the EMA of the evaluated weights. Each would catch a flipped
sign or a swapped coefficient that the end-to-end tests only see as a finite number."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rewardtune.algorithms.ddpm import ddpm_loss
from rewardtune.backbones.epsilon import EpsilonChainPolicy
from rewardtune.metrics.auc import energy_auc
from rewardtune.metrics.sliced_wasserstein import sliced_wasserstein
from rewardtune.rewards.energy import ebm_loss
from rewardtune.trainer import EMA


# ---- sliced Wasserstein ---------------------------------------------------------------------------------------------
def test_sliced_wasserstein_of_a_shift_is_its_length_over_sqrt_d():
    """y = x + c: every projection is shifted by theta.c, so W_2^2 = (theta.c)^2 and SW_2^2 = E (theta.c)^2 =
    ||c||^2 / D for theta uniform on the sphere."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=gen)
    c = torch.tensor([0.6, -0.8, 1.2])
    got = sliced_wasserstein(x, x + c, num_projections=40_000, generator=gen)
    assert got == pytest.approx(float(c.norm()) / math.sqrt(3), rel=0.01)  # Monte Carlo over 40,000 directions
    assert sliced_wasserstein(x, x, generator=gen) == 0.0
    assert sliced_wasserstein(x, x[torch.randperm(500, generator=gen)], generator=gen) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_of_a_scaling_in_one_dimension():
    """In 1-D the only direction is +-1: SW_2(x, a x) = |a - 1| sqrt(mean x^2) exactly."""
    x = torch.linspace(-1, 2, 101, dtype=torch.float64).unsqueeze(1)
    expected = 1.5 * float(x.pow(2).mean().sqrt())
    assert sliced_wasserstein(x, 2.5 * x, num_projections=7) == pytest.approx(expected, rel=1e-12)


# ---- energy AUC -----------------------------------------------------------------------------------------------------
def test_energy_auc_counts_low_energy_as_data():
    data, noise = torch.tensor([-3.0, -2.0, -1.0]), torch.tensor([1.0, 2.0])
    assert energy_auc(data, noise) == 1.0  # every data point has lower energy than every noise point
    assert energy_auc(noise, data) == 0.0
    # one pair out of order among 2 x 2: 3 / 4
    assert energy_auc(torch.tensor([-1.0, 1.5]), torch.tensor([1.0, 2.0])) == pytest.approx(0.75)
    assert energy_auc(torch.zeros(3), torch.zeros(4)) == 0.5  # ties count one half


# ---- EBM loss -------------------------------------------------------------------------------------------------------
def test_ebm_loss_value_and_the_direction_it_pushes_energies():
    e_real = torch.tensor([0.5, -1.0], requires_grad=True)
    e_fake = torch.tensor([2.0, 1.0, 0.0], requires_grad=True)
    loss = ebm_loss(e_real, e_fake, gamma=0.1)
    expected = (-0.25) - 1.0 + 0.1 * ((0.25 + 1.0) / 2 + (4.0 + 1.0 + 0.0) / 3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # descent lowers the data's energy and raises the samples' (gamma's pull towards 0 aside)
    torch.testing.assert_close(e_real.grad, (1 + 2 * 0.1 * e_real.detach()) / 2)
    torch.testing.assert_close(e_fake.grad, (-1 + 2 * 0.1 * e_fake.detach()) / 3)
    assert (ebm_loss(torch.zeros(4), torch.zeros(4), gamma=0.0)) == 0.0


# ---- DDPM loss ------------------------------------------------------------------------------------------------------
class PointMassDenoiser(nn.Module):
    """The exact eps for data that is a point mass at c: eps = (x_k - sqrt(ab_k) c) / sqrt(1 - ab_k)."""

    def __init__(self, c: torch.Tensor, swap: bool = False) -> None:
        super().__init__()
        self.c, self.swap = c, swap
        self.alphas_cumprod: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod[k.long()].view(-1, 1).double()
        if self.swap:  # the coefficients exchanged, as a wrong forward process would have them
            ab = 1 - ab
        return ((x.double() - ab.sqrt() * self.c) / (1 - ab).sqrt()).to(x.dtype)


@pytest.mark.parametrize(("swap", "low", "high"), [(False, 0.0, 1e-8), (True, 0.5, math.inf)])
def test_ddpm_loss_vanishes_for_the_exact_denoiser_only(swap, low, high):
    c = torch.tensor([0.7, -0.4])
    net = PointMassDenoiser(c.double(), swap=swap)
    policy = EpsilonChainPolicy(net, (2,), num_steps=4)
    net.alphas_cumprod = policy.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    loss = float(ddpm_loss(policy, c.expand(4096, 2).clone(), gen))
    assert low <= loss <= high


def test_ddpm_loss_is_a_mean_over_dimensions():
    """eps_theta = 0 leaves E ||eps||^2 / D = 1 whatever the dimension."""

    class Zero(nn.Module):
        def forward(self, x, k):
            return torch.zeros_like(x)

    for dim in (1, 5):
        policy = EpsilonChainPolicy(Zero(), (dim,), num_steps=2)
        loss = float(ddpm_loss(policy, torch.zeros(20_000, dim), torch.Generator().manual_seed(1)))
        assert loss == pytest.approx(1.0, abs=0.03)  # Monte Carlo over 20,000 x dim draws


# ---- EMA ------------------------------------------------------------------------------------------------------------
def test_ema_follows_its_warmed_up_decays_exactly():
    """Towards a constant target the EMA's distance shrinks by prod_i d_i, d_i = min(decay, (1 + i) / (10 + i)); buffers
    are copied, not averaged."""
    module = nn.Linear(1, 1, bias=False)
    module.register_buffer("count", torch.zeros(()))
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = EMA(module, decay=0.9)
    with torch.no_grad():
        module.weight.fill_(1.0)
        module.count.fill_(7.0)
    for _ in range(30):
        ema.update(module)
    remaining = math.prod(min(0.9, (1 + i) / (10 + i)) for i in range(1, 31))
    assert float(ema.module.weight) == pytest.approx(1 - remaining, rel=1e-6)
    assert float(ema.module.count) == 7.0


def test_frechet_distance_needs_two_features_per_set():
    from rewardtune.metrics.fid import frechet_distance

    with pytest.raises(ValueError, match="at least 2 features per set, got 5 and 1"):
        frechet_distance(torch.randn(5, 3), torch.randn(1, 3))
