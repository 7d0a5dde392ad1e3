"""Backbone `gmm` (the exact noise prediction of a diffused Gaussian mixture), data `gmm` and `min_mode_mass`: the
closed form of one diffused Gaussian, FastDPM's fractional timesteps, and the chain sampling the mixture's mode masses."""

from __future__ import annotations

import pytest
import torch

from rewardtune.backbones.gmm import DDPMLevels, MixtureEpsilon, build_gmm_backbone
from rewardtune.backbones.schedules import (
    alpha_bar_at,
    continuous_timestep,
    ddpm_alphas_cumprod,
)
from rewardtune.data.toy import build_gaussian_mixture
from rewardtune.metrics.modes import min_mode_mass


def test_epsilon_of_one_diffused_gaussian_is_the_closed_form_at_integer_and_fractional_steps():
    ab = ddpm_alphas_cumprod(1000)
    mean, var = torch.tensor([[0.7, -1.2]], dtype=torch.float64), 0.3
    net = MixtureEpsilon([1.0], mean, [var], ab)
    x = torch.randn(64, 2, dtype=torch.float64) * 2
    n = torch.tensor([0.0, 1.0, 37.0, 500.25, 998.9, 999.0], dtype=torch.float64).repeat(11)[:64]
    a = DDPMLevels(ab).alpha_bar(n)[:, None]
    expected = (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * var + 1 - a)  # -sqrt(1 - ab) grad log N(sqrt(ab) mu, .)
    torch.testing.assert_close(net(x, n), expected)
    integer = torch.tensor([0, 37, 999])
    torch.testing.assert_close(DDPMLevels(ab).alpha_bar(integer.double()), ab[integer])


def test_fractional_steps_invert_the_schedules_continuous_timestep():
    ab = ddpm_alphas_cumprod(1000)
    wanted = torch.tensor([0.9999, 0.9, 0.31, 0.02, 1e-4], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar_at(continuous_timestep(wanted, ab), ab), wanted)
    torch.testing.assert_close(DDPMLevels(ab).alpha_bar(torch.tensor([3.5])), alpha_bar_at(torch.tensor([3.5]), ab))


def test_the_chain_draws_the_mixtures_mode_masses_and_min_mode_mass_finds_the_weak_mode():
    centers = [[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]]
    policy = build_gmm_backbone((2,), weights=[0.33, 0.33, 0.32, 0.02], means=centers, variances=[0.1] * 4,
                                num_steps=50)
    assert not any(p.requires_grad for p in policy.parameters())
    with torch.no_grad():
        x = policy.sample(4000, generator=torch.Generator().manual_seed(0)).states[-1]
    masses = torch.bincount(torch.cdist(x.double(), torch.tensor(centers).double()).argmin(1), minlength=4) / 4000
    torch.testing.assert_close(masses.double(), torch.tensor([0.33, 0.33, 0.32, 0.02], dtype=torch.float64),
                               atol=0.03, rtol=0)  # binomial std <= 0.0075
    assert min_mode_mass(x, torch.tensor(centers)) == pytest.approx(float(masses[3]))
    data = build_gaussian_mixture(centers=centers, std=0.1**0.5)
    assert min_mode_mass(data.sample(4000, torch.Generator().manual_seed(1)), data.centers) > 0.22


@pytest.mark.parametrize("options, match", [
    ({"means": [[0.0, 0.0, 0.0]]}, "means must be"),
    ({"weights": [0.5, 0.5]}, "one entry per component"),
    ({"variances": [0.0]}, "variances must be positive"),
])
def test_bad_mixtures_are_one_line_errors(options, match):
    settings = {"weights": [1.0], "means": [[0.0, 0.0]], "variances": [1.0]} | options
    with pytest.raises(ValueError, match=match):
        build_gmm_backbone((2,), **settings)
    with pytest.raises(ValueError, match="centers must be"):
        build_gaussian_mixture(centers=[[0.0, 0.0]], std=1.0)
