"""Reward `discriminator`: r = f*(f'(exp l)) is minus the functional derivative of D_f(P || Q) in q, and the
classifier's logit learns the log density ratio."""

from __future__ import annotations

import math

import pytest
import torch

from rewardtune.f_divergences import get_f_divergence
from rewardtune.rewards.discriminator import (
    build_discriminator_reward,
    f_divergence_reward,
)

CLOSED_FORMS = {
    "reverse_kl": lambda l: l - 1,
    "kl": torch.exp,
    "pearson": lambda l: torch.exp(2 * l) - 1,
    "squared_hellinger": lambda l: torch.exp(l / 2) - 1,
}


@pytest.mark.parametrize("name", CLOSED_FORMS)
def test_the_reward_has_its_closed_form(name):
    logit = torch.linspace(-3, 3, 13, dtype=torch.float64)
    assert torch.allclose(f_divergence_reward(get_f_divergence(name), logit), CLOSED_FORMS[name](logit))


@pytest.mark.parametrize("name", ["reverse_kl", "kl", "js", "pearson", "squared_hellinger"])
def test_the_reward_is_minus_the_derivative_of_the_divergence_in_the_sampler(name):
    """D(q) = sum_i q_i f(p_i / q_i) on a finite space: dD / dq_i = f(u_i) - u_i f'(u_i) = -r_i."""
    div = get_f_divergence(name)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((q * div.f(p / q)).sum(), q)
    reward = f_divergence_reward(div, (p / q).log().detach())
    assert torch.allclose(-grad, reward, atol=1e-10)


def test_the_classifier_learns_the_log_ratio_of_two_gaussians():
    torch.manual_seed(0)
    reward = build_discriminator_reward((1,), hidden=32, depth=2, lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        real = torch.randn(256, 1, generator=gen) * 0.5 + 1.0  # P = N(1, 0.25)
        fake = torch.randn(256, 1, generator=gen)  # Q = N(0, 1)
        reward.update(real, fake)
    x = torch.linspace(-0.5, 2.0, 11)[:, None]
    exact = (-0.5 * ((x - 1) / 0.5) ** 2 - math.log(0.5)) - (-0.5 * x**2)
    with torch.no_grad():
        learned = reward.logit(x)[:, None]
    assert (learned - exact).abs().max() < 0.35, (learned.flatten(), exact.flatten())
    assert torch.allclose(reward(x), learned.flatten() - 1)  # reverse KL: the log-ratio minus 1


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="unknown divergence"):
        build_discriminator_reward((2,), divergence="wasserstein")
    with pytest.raises(ValueError, match="for images"):
        build_discriminator_reward((2,), network="resnet")
