"""The KL safeguard: beta ||mean_phi - mean_init||^2 / (2 sigma^2) against a frozen copy of the starting policy."""

from __future__ import annotations

import torch
from helpers import LinearPolicy, QuadraticCost

from rewardtune.algorithms.dxdp import DxDP, DxDPConfig
from rewardtune.nets.value import build_time_mlp_value

SIGMA = torch.tensor([0.5, 0.3])


def make(kl_weight: float, target: float = 3.0):
    torch.manual_seed(0)  # the value's initial weights: the outcome must not depend on which tests ran before
    policy = LinearPolicy((2,), torch.ones(2), torch.zeros(2, 2), SIGMA, learn_mean=True)
    value = build_time_mlp_value((2,), hidden=16, depth=1, lr=1e-2)
    # terminal = "reward": the last step follows the (differentiable) reward itself, so the drift without the
    # safeguard does not hinge on how fast a randomly initialised value learns (with terminal = "value" it ranged
    # 0.08-2.6 over initialisations in 150 iterations; here 4.5-7.8, against 0.21 with beta = 5)
    cfg = DxDPConfig(
        tau_entropy=0.0, tau_velocity=0.0, kl_weight=kl_weight, sampler_lr=5e-2, sigma_lr=0.0, terminal="reward"
    )
    return policy, DxDP(policy, QuadraticCost(torch.full((2,), target)), value, config=cfg)


def test_kl_term_is_the_gaussian_kl_at_equal_sigma():
    policy, algo = make(kl_weight=0.7)
    with torch.no_grad():
        policy.b += torch.tensor([[0.2, -0.1], [0.3, 0.4]])  # move away from the frozen reference
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 1, 0, 1])
    noise = torch.zeros(5, 2)
    _, without = make(kl_weight=0.0)
    without.backbone.load_state_dict(policy.state_dict())
    without.value.load_state_dict(algo.value.state_dict())
    delta = policy.b.detach()[t] - algo.reference.b[t]  # a is unchanged, so mean - mean_init = b - b_init
    expected = 0.7 * (delta.pow(2).sum(1) / (2 * SIGMA[t] ** 2)).mean()
    # float32 arithmetic on O(1) numbers
    torch.testing.assert_close(algo.policy_loss(x, t, noise) - without.policy_loss(x, t, noise), expected, rtol=1e-5, atol=1e-6)


def test_kl_safeguard_keeps_the_policy_near_its_start():
    gen = torch.Generator().manual_seed(0)
    drift = {}
    for beta in (0.0, 5.0):
        policy, algo = make(kl_weight=beta)
        for _ in range(150):
            algo.update(torch.zeros(1, 2), policy.sample(64, gen), gen)
        drift[beta] = float((policy.b.detach() - algo.reference.b if algo.reference is not None else policy.b.detach()).norm())
    # the reward pulls samples to (3, 3): without the safeguard the offsets move far, with it much less
    assert drift[0.0] > 1.0
    assert drift[5.0] < 0.5 * drift[0.0]
