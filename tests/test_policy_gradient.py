"""The policy-gradient baseline: soft returns, PPO's clipped surrogate, the kNN entropy term, and optimality on the
linear-quadratic-Gaussian problem of Eq. (8) (the same optimum DxDP reaches in test_dxdp.py)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import QuadraticCost, QuadraticValueNet, lqg_objective, lqg_optimum
from test_dxdp import SIGMA0, TARGET, TAU, D, T, _initial_policy, _lr_scale

from rewardtune.algorithms.dxdp import velocity_cost
from rewardtune.algorithms.policy_gradient import (
    PolicyGradient,
    PolicyGradientConfig,
    build_policy_gradient,
    knn_log_distance,
    ppo_clip_loss,
    running_costs,
    soft_returns,
)
from rewardtune.nets.value import ValueFunction
from rewardtune.types import Trajectory


def test_soft_returns_sum_the_running_costs_to_go():
    r = torch.tensor([1.0, -2.0])
    costs = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])  # [T=3, B=2]
    expected = torch.tensor([[1 - 0.9, -2 - 1.2], [1 - 0.8, -2 - 1.0], [1 - 0.5, -2 - 0.6]])
    torch.testing.assert_close(soft_returns(r, costs), expected)


def test_running_costs_are_the_entropy_and_velocity_terms_of_eq8():
    gen = torch.Generator().manual_seed(0)
    policy = _initial_policy()
    traj = policy.sample(5, gen)
    s2 = torch.tensor([0.3, 0.7])
    costs = running_costs(traj, s2, 0.5, 0.25)
    kl = torch.rand(T, 5, generator=gen)
    with_kl = running_costs(traj, s2, 0.5, 0.25, kl=kl, kl_weight=0.125)
    for t in range(T):
        vel = velocity_cost(traj.states[t], traj.states[t + 1], s2[t])
        log_prob = policy.log_prob(traj.states[t + 1], traj.states[t], torch.full((5,), t))
        torch.testing.assert_close(costs[t], 0.5 * log_prob + 0.25 * vel)
        torch.testing.assert_close(with_kl[t], costs[t] + 0.125 * kl[t])  # the KL safeguard's running cost


def test_the_soft_return_carries_the_sampled_kl_to_the_reference():
    """With kl_weight, G_t subtracts beta sum_{u >= t} (log pi_old - log pi_ref)(x_{u+1} | x_u); checked through the
    baseline regression: with a zero baseline net and lr 0, value/loss = mean G_t^2."""
    gen = torch.Generator().manual_seed(0)
    policy = _initial_policy()
    cfg = PolicyGradientConfig(tau_entropy=0.0, kl_weight=0.5, value_warmup=10)
    algo = build_policy_gradient(policy, QuadraticCost(TARGET), ValueFunction(QuadraticValueNet(D, T + 1), lr=0.0), config=cfg)
    with torch.no_grad():  # move away from the reference so that the log-ratio is not zero
        policy.b += 0.5
        policy.log_sigma += 0.2
    traj = policy.sample(64, gen)
    metrics = algo.update(None, traj, gen)
    log_ratio = torch.stack(
        [traj.log_probs[t] - algo.reference.log_prob(traj.states[t + 1], traj.states[t], torch.full((64,), t)) for t in range(T)]
    )
    returns = QuadraticCost(TARGET)(traj.final) - 0.5 * log_ratio.flip(0).cumsum(0).flip(0)  # [T, B]
    assert metrics["value/loss"] == pytest.approx(float(returns.pow(2).mean()), rel=1e-5)  # float32
    assert metrics["policy/path_kl"] == pytest.approx(float(log_ratio.sum(0).mean()), rel=1e-5)  # float32


def test_advantages_use_the_baseline_before_its_own_update():
    """A_t = G_t - V(x_t, t) with V as it was when the batch was drawn: the baseline's regression step on these same
    returns comes after (else the advantage would partly subtract the returns from themselves)."""
    gen = torch.Generator().manual_seed(0)
    policy = _initial_policy()
    net = QuadraticValueNet(D, T + 1, alpha=0.3, beta=torch.tensor([0.5, -0.5]), gamma=-1.0)
    cfg = PolicyGradientConfig(normalize_advantages=False)
    algo = build_policy_gradient(policy, QuadraticCost(TARGET), ValueFunction(net, lr=0.1), config=cfg)
    traj = policy.sample(32, gen)
    returns = torch.randn(T, 32, generator=gen)
    x, t = traj.states[:-1].flatten(0, 1), torch.arange(T).repeat_interleave(32)
    with torch.no_grad():
        before = algo.value(x, t).view(T, 32)
    advantage, _ = algo.advantages(traj, returns)
    with torch.no_grad():
        after = algo.value(x, t).view(T, 32)
    assert (after - before).abs().max() > 0.05  # the baseline did take its (lr 0.1) step
    torch.testing.assert_close(advantage, returns - before, rtol=0, atol=1e-6)  # float32 subtraction


def test_per_dimension_divides_every_weight_by_the_sample_dimension():
    """per_dimension = true with (tau1, tau2, beta) is the policy gradient with (tau1/D, tau2/D, beta/D); D = 2."""

    def two_iterations(per_dimension, tau1, tau2, beta):
        torch.manual_seed(0)
        policy = _initial_policy()
        cfg = PolicyGradientConfig(
            tau_entropy=tau1, tau_velocity=tau2, kl_weight=beta, per_dimension=per_dimension, sampler_lr=1e-2, sigma_lr=1e-2
        )
        algo = build_policy_gradient(policy, QuadraticCost(TARGET), ValueFunction(QuadraticValueNet(D, T + 1), lr=1e-2), config=cfg)
        with torch.no_grad():
            policy.b += 0.3  # a non-zero KL to the reference from the first iteration on
        gen = torch.Generator().manual_seed(1)
        losses = [algo.update(None, policy.sample(32, gen), gen)["value/loss"] for _ in range(2)]
        return torch.tensor(losses, dtype=torch.float64), [p.detach().clone() for p in policy.parameters()]

    losses, params = two_iterations(True, 0.5, 0.25, 0.75)
    losses_divided, params_divided = two_iterations(False, 0.25, 0.125, 0.375)
    losses_undivided, _ = two_iterations(False, 0.5, 0.25, 0.75)
    torch.testing.assert_close(losses, losses_divided, rtol=1e-5, atol=1e-6)  # float32, tau * (1/D) vs tau / D
    for p, q in zip(params, params_divided):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # as above
    assert ((losses - losses_undivided).abs() > 0.05 * losses.abs()).any()  # the undivided weights differ visibly


def test_ppo_surrogate_is_reinforce_at_ratio_one_and_clips_beyond_the_range():
    theta = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    old = theta.detach().clone()
    advantage = torch.tensor([1.0, -2.0, 0.5])
    loss, clip_fraction, approx_kl = ppo_clip_loss(theta, old, advantage, 0.2)
    (grad,) = torch.autograd.grad(loss, theta)
    torch.testing.assert_close(grad, -advantage / 3)  # d/dlog pi of -mean(rho A) at rho = 1: REINFORCE
    assert float(clip_fraction) == 0 and abs(float(approx_kl)) < 1e-12
    # rho = e^0.5 > 1.2 with A > 0: the clipped term is constant, no gradient; with A < 0 the unclipped term is used.
    shifted = (old + 0.5).requires_grad_(True)
    loss, clip_fraction, _ = ppo_clip_loss(shifted, old, advantage, 0.2)
    (grad,) = torch.autograd.grad(loss, shifted)
    assert grad[0] == 0 and grad[2] == 0 and grad[1] != 0
    assert float(clip_fraction) == 1


def test_knn_log_distance_matches_brute_force():
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    got = knn_log_distance(x, 3)
    for i in range(20):
        distances = sorted(float((x[i] - x[j]).norm()) for j in range(20) if j != i)
        assert got[i].item() == pytest.approx(math.log(distances[2]), rel=1e-5)
    with pytest.raises(ValueError, match="more than k"):
        knn_log_distance(x[:3], 3)


def test_first_ppo_step_starts_from_ratio_one():
    """The sampled log-probs (from the noise) equal the policy's log_prob of the same transitions: rho = 1."""
    gen = torch.Generator().manual_seed(0)
    policy = _initial_policy()
    cfg = PolicyGradientConfig(tau_entropy=TAU, sampler_lr=0.0, sigma_lr=0.0)
    algo = PolicyGradient(policy, QuadraticCost(TARGET), None, config=cfg)
    metrics = algo.update(None, policy.sample(64, gen), gen)
    assert metrics["policy/clip_fraction"] == 0 and abs(metrics["policy/approx_kl"]) < 1e-6


def test_policy_gradient_reaches_the_lqg_optimum_of_eq8():
    """PPO with a value baseline, on the problem test_dxdp.py solves with DxDP and BPTT, reaches the analytic optimum
    of Eq. (8) (entropy and velocity costs, fixed s_t). The starting gap is 2.06; observed final gaps 3e-6 to 6e-6 and
    parameter errors <= 1.1e-3 (4 seeds); the tolerances are test_dxdp.py's."""
    torch.manual_seed(0)
    s2 = SIGMA0.pow(2)
    j_star, a_star, b_star, sigma_star = lqg_optimum(TARGET, TAU, s2, D)
    policy = _initial_policy()
    cfg = PolicyGradientConfig(
        tau_entropy=TAU, tau_velocity=TAU, avr=False, sampler_lr=1e-2, sigma_lr=1e-2, ppo_epochs=4, minibatches=2
    )
    algo = build_policy_gradient(policy, QuadraticCost(TARGET), ValueFunction(QuadraticValueNet(D, T + 1), lr=5e-2), config=cfg)
    gen = torch.Generator().manual_seed(1)
    n_iter = 1000
    for i in range(n_iter):
        scale = _lr_scale(i, n_iter)
        algo.sampler_optimizer.set_lr_scale(scale)
        algo.value.optimizer.set_lr_scale(scale)
        algo.update(None, policy.sample(256, gen), gen)
    gap = lqg_objective(policy, TARGET, TAU, s2) - j_star
    assert gap < 2e-3, gap
    torch.testing.assert_close(policy.a.detach().double(), a_star, rtol=0, atol=5e-2)
    torch.testing.assert_close(policy.sigma().detach().double(), sigma_star, rtol=0, atol=5e-2)
    torch.testing.assert_close(policy.b.detach().double(), b_star, rtol=0, atol=5e-2)


def test_policy_gradient_refuses_guidance_and_bad_settings():
    from rewardtune.errors import RecipeError

    policy = _initial_policy()
    algo = build_policy_gradient(policy, QuadraticCost(TARGET), None, config=PolicyGradientConfig())
    with pytest.raises(RecipeError, match="value guidance"):
        algo.guide(1.0)
    with pytest.raises(ValueError, match="clip_range"):
        build_policy_gradient(policy, QuadraticCost(TARGET), None, config=PolicyGradientConfig(clip_range=0.0))
    with pytest.raises(ValueError, match="needs a \\[reward\\]"):
        build_policy_gradient(policy, None, None, config=PolicyGradientConfig())
    guided = Trajectory(states=torch.zeros(T + 1, 4, D), sigmas=SIGMA0, log_probs=None)
    with pytest.raises(ValueError, match="log-probs"):
        algo.update(None, guided, None)


def test_policy_gradient_refuses_a_time_independent_value_that_is_the_energy():
    """The baseline regresses V(x, t) on returns at t < T; a time-independent value shared with the energy would be
    that energy, overwritten every iteration. A time-dependent shared value keeps its own t = T slot and is allowed."""
    from rewardtune.nets.value import build_time_mlp_value
    from rewardtune.rewards.energy import build_energy_reward

    policy = _initial_policy()
    flat = build_time_mlp_value((D,), hidden=8, depth=1, time_dim=8, lr=1e-3, time_dependent=False)
    with pytest.raises(ValueError, match="time-independent"):
        build_policy_gradient(policy, build_energy_reward((D,), flat, T), flat, config=PolicyGradientConfig())
    timed = build_time_mlp_value((D,), hidden=8, depth=1, time_dim=8, lr=1e-3)
    build_policy_gradient(policy, build_energy_reward((D,), timed, T), timed, config=PolicyGradientConfig())
    with pytest.raises(ValueError, match="knn_entropy"):
        build_policy_gradient(policy, QuadraticCost(TARGET), None, config=PolicyGradientConfig(knn_entropy=-1.0))


def test_policy_gradient_feeds_a_normalising_composite_its_statistics():
    """A composite reward with normalize = true standardises by running statistics it updates only when scored
    with gradients enabled; the policy gradient's terminal reward must update them (one batch of final samples per
    iteration), or normalisation would silently stay at mean 0, variance 1."""
    from rewardtune.rewards.composite import CompositeReward

    composite = CompositeReward({"quad": (QuadraticCost(TARGET), 1.0)}, normalize=True, momentum=0.5)
    algo = build_policy_gradient(_initial_policy(), composite, None, config=PolicyGradientConfig(sampler_lr=1e-2))
    gen = torch.Generator().manual_seed(0)
    expected_mean = None
    for n in range(1, 5):  # once per iteration, policy steps included
        traj = algo.backbone.sample(64, gen)
        batch_mean = float(QuadraticCost(TARGET)(traj.final).double().mean())
        expected_mean = batch_mean if expected_mean is None else expected_mean + 0.5 * (batch_mean - expected_mean)
        algo.update(None, traj, gen)
        assert int(composite.num_updates) == n
    torch.testing.assert_close(composite.running_mean, torch.tensor([expected_mean], dtype=torch.float64), rtol=1e-6, atol=0)


def test_knn_bonus_with_too_few_samples_per_process_is_a_recipe_error():
    from rewardtune.errors import RecipeError

    algo = build_policy_gradient(_initial_policy(), QuadraticCost(TARGET), None, config=PolicyGradientConfig(knn_entropy=0.1, knn_k=5))
    traj = algo.backbone.sample(4, torch.Generator().manual_seed(0))
    with pytest.raises(RecipeError, match="algorithm.knn_k: the kNN entropy bonus needs more than k = 5 samples per process, got 4"):
        algo.update(None, traj, None)
