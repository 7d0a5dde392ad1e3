"""The maths of DDAEBM (algorithms/ddaebm.py, backbones/posterior.py, rewards/time_energy.py; paper 003, Sec. 3,
Eqs. 6-21) against closed forms: densities against torch.distributions, the gradient penalty and the energy step on
quadratic energies, the forward-KL weights (Eq. 21), L2 as a Gaussian negative ELBO and L1's entropy identity on a
linear generator, and the marginals of the posterior-sampling chain.

Monte Carlo checks use fixed seeds and a tolerance of 5 standard errors estimated from the samples themselves.
Levels k = 0..T count from (near-)data to noise; chain state x_t is level k = T - t.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from rewardtune.algorithms.ddaebm import (
    DDAEBM,
    diagonal_normal_log_density,
    energy_step_loss,
    forward_kl_bound,
    forward_kl_weights,
    gaussian_log_density,
    kl_to_standard_normal,
    log_forward_step,
    reverse_kl_bound,
    zero_centred_penalty,
)
from rewardtune.backbones.posterior import PosteriorSamplingPolicy
from rewardtune.backbones.schedules import (
    ddpm_posterior,
    forward_pairs,
    vp_sde_schedule,
    vp_sde_times,
)
from rewardtune.optim import GradStep
from rewardtune.rewards.time_energy import TimeEnergy
from rewardtune.types import Trajectory

F64 = torch.float64
LOG_2PI_E = math.log(2 * math.pi * math.e)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_mc_mean(samples: torch.Tensor, expected: float, what: str, n_se: float = 5.0) -> None:
    """The mean of i.i.d. `samples` [N] equals `expected` within n_se standard errors (estimated from the samples)."""
    mean = float(samples.mean())
    se = float(samples.std()) / math.sqrt(samples.numel())
    assert abs(mean - expected) <= n_se * se + 1e-12, f"{what}: MC mean {mean:.6f} vs {expected:.6f} (SE {se:.2e})"


# ---- tiny closed-form modules ---------------------------------------------------------------------------------------
class QuadraticLevelEnergy(nn.Module):
    """E(x, k) = -a/2 (1 + k) ||x||^2 with a learnable scalar a (the level enters so an off-by-one shows)."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=F64))

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.a * (1 + levels.to(x.dtype)) * x.flatten(1).pow(2).sum(1)


class LinearGenerator(nn.Module):
    """G(x_k, z, k) = A x_k + B z (ignores k)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)

    def forward(self, x: torch.Tensor, z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T.to(x.dtype) + z.to(x.dtype) @ self.b.T.to(x.dtype)


class ConstantGenerator(nn.Module):
    """G(x_k, z, k) = c whatever its inputs."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("c", c)

    def forward(self, x: torch.Tensor, z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return self.c.to(x.dtype).expand(x.shape).clone()


class TanhGenerator(nn.Module):
    """A nonlinear G: 2 tanh(W x + V z) + 0.1 k."""

    def forward(self, x: torch.Tensor, z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        w = torch.tensor([[0.9, -0.4], [0.3, 1.1]], dtype=x.dtype)
        v = torch.tensor([[1.5, 0.2], [-0.7, 0.8]], dtype=x.dtype)
        return 2 * torch.tanh(x @ w.T + z @ v.T) + 0.1 * levels.to(x.dtype)[:, None]


class CubicGenerator(nn.Module):
    """Another nonlinear G: x sin(3 z_1) + z_2^3 (x0_hat non-Gaussian in z)."""

    def forward(self, x: torch.Tensor, z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return x * torch.sin(3 * z[:, :1]) + z[:, 1:].pow(3)


def linear_case():
    """A, B with B^T B diagonal (B = R diag(1.5, 0.7), R a rotation), so p(z | x_{k-1}, x_k) is a diagonal Gaussian
    (what a mean/log_var encoder can represent) while B B^T, and so Cov(x_{k-1} | x_k), is not diagonal."""
    a = torch.tensor([[0.8, -0.3], [0.2, 0.5]], dtype=F64)
    angle = torch.tensor(0.6, dtype=F64)
    rotation = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    b = rotation @ torch.diag(torch.tensor([1.5, 0.7], dtype=F64))
    schedule = vp_sde_schedule(4)
    policy = PosteriorSamplingPolicy(LinearGenerator(a, b), (2,), schedule, latent_dim=2)
    return policy, a, b


def linear_marginal(policy: PosteriorSamplingPolicy, a: torch.Tensor, b: torch.Tensor, k: int):
    """p_phi(x_{k-1} | x_k) = N(M x_k, Sigma): M = c0 A + ck I, Sigma = c0^2 B B^T + s^2 I (the policy's float32
    coefficients, read in float64), and c0, s^2."""
    c0 = policy.coef_x0[k].double()
    ck = policy.coef_xk[k].double()
    s2 = policy.posterior_std[policy.num_steps - k].double() ** 2
    m = c0 * a + ck * torch.eye(2, dtype=F64)
    sigma = c0**2 * b @ b.T + s2 * torch.eye(2, dtype=F64)
    return m, sigma, c0, s2


def exact_latent_posterior(x_prev, x_k, m, b, c0, s2):
    """p(z | x_{k-1}, x_k) for z ~ N(0, I), x_{k-1} = M x_k + c0 B z + s eps: precision I + c0^2 B^T B / s^2 (diagonal
    here), mean = Cov c0 B^T (x_{k-1} - M x_k) / s^2. Returns (mean [N, d], log_var [N, d])."""
    precision = torch.eye(2, dtype=F64) + c0**2 * b.T @ b / s2
    assert torch.allclose(precision, torch.diag(torch.diagonal(precision)), atol=1e-12)
    cov = torch.linalg.inv(precision)
    mean = (x_prev - x_k @ m.T) @ (c0 * b / s2) @ cov.T
    return mean, torch.diagonal(cov).log().expand_as(mean)


def negative_elbo(policy, x_prev, x_k, k, enc_mean, enc_log_var, s2, g):
    """Per-sample L2 (weights 1) with z ~ N(enc_mean, exp(enc_log_var)): (values [N], z, reconstruction log-density)."""
    n = x_prev.shape[0]
    levels = torch.full((n,), k)
    z = enc_mean + (0.5 * enc_log_var).exp() * torch.randn(enc_mean.shape, generator=g, dtype=F64)
    x0 = policy.predict_x0(x_k, levels, z)
    recon = gaussian_log_density(x_prev, policy.posterior_mean(x_k, levels, x0), s2)
    return forward_kl_bound(recon, enc_mean, enc_log_var, torch.ones(n, dtype=F64)), z, recon


# ---- 1. the zero-centred gradient penalty ---------------------------------------------------------------------------
def test_zero_centred_penalty_of_a_quadratic_energy_and_its_gradient():
    """E(x) = -a/2 ||x - m||^2: grad_x E = -a (x - m), so penalty = gamma/2 mean_b a^2 ||x_b - m||^2 and
    d penalty / d a = gamma a mean_b ||x_b - m||^2 (the penalty must stay differentiable in the energy's parameters)."""
    gamma = 0.3
    a = torch.tensor(1.7, dtype=F64, requires_grad=True)
    m = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=F64).view(1, 1, 2, 2)
    x = torch.randn((6, 1, 2, 2), generator=seeded(0), dtype=F64).requires_grad_(True)  # image-shaped: flattened
    scores = -0.5 * a * (x - m).flatten(1).pow(2).sum(1)
    penalty = zero_centred_penalty(scores, x, gamma)
    sq = (x.detach() - m).flatten(1).pow(2).sum(1)  # [B]
    torch.testing.assert_close(penalty, 0.5 * gamma * a.detach() ** 2 * sq.mean(), rtol=1e-12, atol=0)
    (grad_a,) = torch.autograd.grad(penalty, a)
    torch.testing.assert_close(grad_a, gamma * a.detach() * sq.mean(), rtol=1e-12, atol=0)


# ---- 2. the energy step -----------------------------------------------------------------------------------------
def test_energy_step_loss_is_the_papers_objective_with_the_conditional_penalty():
    """L_E = -mean E(x_{k-1}, k-1) + w mean E(x~_{k-1}, k-1) + gamma/2 mean ||grad_{x_{k-1}} [E(x_{k-1}, k-1)
    + log q(x_k | x_{k-1})]||^2, by hand for E(x, k) = -a/2 (1 + k) ||x||^2 (so E(x, k-1) = -a k/2 ||x||^2):
    grad E = -a k x_{k-1}, grad log q(x_k | x_{k-1}) = sqrt(1-b)(x_k - sqrt(1-b) x_{k-1}) / b with b = beta_k."""
    gamma, fake_weight, a = 0.3, 0.7, 0.9
    network = QuadraticLevelEnergy(a)
    energy = TimeEnergy(network, 4, GradStep([(network.parameters(), 1e-3)]))
    betas = vp_sde_schedule(4).betas
    g = seeded(1)
    levels = torch.tensor([1, 2, 3, 4, 2])
    real_prev, x_k = torch.randn((5, 3), generator=g, dtype=F64), torch.randn((5, 3), generator=g, dtype=F64)
    fake_prev = torch.randn((5, 3), generator=g, dtype=F64).requires_grad_(True)

    loss, parts = energy_step_loss(energy, real_prev, x_k, fake_prev, levels, betas, gamma=gamma,
                                   fake_weight=fake_weight)

    k = levels.to(F64)[:, None]  # [B, 1]
    b = betas[levels][:, None]
    e_real = -0.5 * a * k[:, 0] * real_prev.pow(2).sum(1)
    e_fake = -0.5 * a * k[:, 0] * fake_prev.detach().pow(2).sum(1)
    grad = -a * k * real_prev + (1 - b).sqrt() * (x_k - (1 - b).sqrt() * real_prev) / b  # [B, D]
    penalty = 0.5 * gamma * grad.pow(2).sum(1).mean()
    expected = -e_real.mean() + fake_weight * e_fake.mean() + penalty
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert parts["energy/real"] == pytest.approx(float(e_real.mean()), rel=1e-12)
    assert parts["energy/fake"] == pytest.approx(float(e_fake.mean()), rel=1e-12)
    assert parts["energy/penalty"] == pytest.approx(float(penalty), rel=1e-12)

    # d L_E / d a: the E terms are linear in a; d penalty / d a = gamma mean_b <grad_b, -k_b x_b>
    d_expected = (0.5 * k[:, 0] * real_prev.pow(2).sum(1)).mean() \
        - fake_weight * (0.5 * k[:, 0] * fake_prev.detach().pow(2).sum(1)).mean() \
        + gamma * (grad * (-k * real_prev)).sum(1).mean()
    loss.backward()
    torch.testing.assert_close(network.a.grad, d_expected, rtol=1e-12, atol=0)
    assert fake_prev.grad is None  # generated samples are detached in the energy step

    loss0, parts0 = energy_step_loss(energy, real_prev, x_k, fake_prev, levels, betas, gamma=0.0, fake_weight=1.0)
    torch.testing.assert_close(loss0, -e_real.mean() + e_fake.mean(), rtol=1e-12, atol=0)
    assert parts0["energy/penalty"] == 0.0


def test_reverse_kl_bound_per_sample():
    """L1's integrand (Eq. 17): -E(x~_{k-1}, k-1) - log q(x_k | x~_{k-1}) - w log q_psi(z | x~_{k-1}, x_k), by hand."""
    network = QuadraticLevelEnergy(0.9)
    energy = TimeEnergy(network, 4, GradStep([(network.parameters(), 1e-3)]))
    betas = vp_sde_schedule(4).betas
    g = seeded(9)
    levels = torch.tensor([1, 2, 3, 4])
    fake_prev, x_k = torch.randn((4, 3), generator=g, dtype=F64), torch.randn((4, 3), generator=g, dtype=F64)
    latent = torch.randn(4, generator=g, dtype=F64)
    step = torch.stack([MultivariateNormal((1 - betas[k]).sqrt() * fake_prev[i], betas[k] * torch.eye(3, dtype=F64))
                        .log_prob(x_k[i]) for i, k in enumerate(levels.tolist())])
    without = 0.5 * 0.9 * levels.to(F64) * fake_prev.pow(2).sum(1) - step
    torch.testing.assert_close(reverse_kl_bound(energy, fake_prev, x_k, levels, betas, None, 0.1), without,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reverse_kl_bound(energy, fake_prev, x_k, levels, betas, latent, 0.1),
                               without - 0.1 * latent, rtol=1e-12, atol=1e-12)


# ---- 3. the densities against torch.distributions --------------------------------------------------------------------
def test_gaussian_densities_and_kl_match_torch_distributions():
    g = seeded(2)
    x = torch.randn((4, 2, 3), generator=g, dtype=F64)
    mean = torch.randn((4, 2, 3), generator=g, dtype=F64)
    variance = torch.tensor([0.3, 1.0, 2.5, 0.01], dtype=F64)
    reference = Independent(Normal(mean, variance.sqrt().view(-1, 1, 1).expand_as(mean)), 2).log_prob(x)
    torch.testing.assert_close(gaussian_log_density(x, mean, variance), reference, rtol=1e-12, atol=1e-12)
    scalar = MultivariateNormal(mean.flatten(1), 0.7 * torch.eye(6, dtype=F64)).log_prob(x.flatten(1))
    torch.testing.assert_close(gaussian_log_density(x, mean, 0.7), scalar, rtol=1e-12, atol=1e-12)

    # log q(x_k | x_{k-1}) = log N(x_k; sqrt(1 - beta_k) x_{k-1}, beta_k I) (Eq. 4)
    betas = vp_sde_schedule(4).betas
    levels = torch.tensor([1, 2, 3, 4])
    x_prev, x_k = torch.randn((4, 3), generator=g, dtype=F64), torch.randn((4, 3), generator=g, dtype=F64)
    for i, level in enumerate(levels.tolist()):
        b = betas[level]
        step = MultivariateNormal((1 - b).sqrt() * x_prev[i], b * torch.eye(3, dtype=F64))
        torch.testing.assert_close(log_forward_step(x_k, x_prev, betas[levels])[i], step.log_prob(x_k[i]),
                                   rtol=1e-12, atol=1e-12)

    # the encoder's diagonal Gaussian and its KL to N(0, I)
    z = torch.randn((5, 3), generator=g, dtype=F64)
    mu = torch.randn((5, 3), generator=g, dtype=F64)
    log_var = torch.randn((5, 3), generator=g, dtype=F64)
    q = Independent(Normal(mu, (0.5 * log_var).exp()), 1)
    torch.testing.assert_close(diagonal_normal_log_density(z, mu, log_var), q.log_prob(z), rtol=1e-12, atol=1e-12)
    prior = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    torch.testing.assert_close(kl_to_standard_normal(mu, log_var), kl_divergence(q, prior), rtol=1e-12, atol=1e-12)


# ---- 4. the forward-KL weights (Eq. 21) -----------------------------------------------------------------------------
def test_forward_kl_weights_follow_eq_21_and_the_official_expression():
    times = torch.tensor([0.001, 0.2, 0.5, 0.75, 1.0], dtype=F64)
    weights = forward_kl_weights(times, 0.6, 0.2)
    assert float(weights[-1]) == pytest.approx(0.6, rel=1e-12)  # lambda(1) = w
    assert float(weights[2]) == pytest.approx(0.2, rel=1e-12)  # lambda(1/2) = w_mid
    official = 0.6 * times ** math.log(0.2 / 0.6, 0.5)  # the official code's weight = 0.6 * t ** log_{0.5}(0.2/0.6)
    torch.testing.assert_close(weights, official, rtol=1e-12, atol=0)
    assert bool((weights[:-1] < weights[1:]).all())  # w_mid < w: the exponent is positive, lambda rises with t'
    level_times = vp_sde_times(4)
    torch.testing.assert_close(forward_kl_weights(level_times, 1.3, 1.3), torch.full((5,), 1.3, dtype=F64),
                               rtol=1e-12, atol=0)
    for w, w_mid in ((0.0, 0.2), (0.6, 0.0), (-1.0, 0.5), (0.5, -0.1)):
        with pytest.raises(ValueError, match="w > 0 and w_mid > 0"):
            forward_kl_weights(times, w, w_mid)


# ---- 5. L2 is the Gaussian negative ELBO ------------------------------------------------------------------------
def test_forward_kl_bound_is_the_negative_log_likelihood_with_the_exact_encoder():
    """Linear G(x_k, z) = A x_k + B z: p_phi(x_{k-1} | x_k) = N(M x_k, c0^2 B B^T + s^2 I). With q_psi the exact
    posterior p(z | x_{k-1}, x_k), E_{z ~ q}[KL(q || N(0, I)) - log q(x_{k-1} | x_k, G(x_k, z))] = -log p_phi(x_{k-1}
    | x_k); another encoder exceeds it by KL(q' || p(z | x_{k-1}, x_k))."""
    policy, a, b = linear_case()
    k, n = 2, 100_000
    m, sigma, c0, s2 = linear_marginal(policy, a, b, k)
    assert float(s2) > 0.1
    pairs_k = torch.tensor([[0.3, -1.2], [1.0, 0.5], [-0.4, 0.0]], dtype=F64)
    pairs_prev = torch.tensor([[1.0, 0.4], [-2.0, 1.5], [0.2, -0.3]], dtype=F64)
    g = seeded(3)
    for x_k, x_prev in zip(pairs_k, pairs_prev):
        nll = -MultivariateNormal(m @ x_k, sigma).log_prob(x_prev)
        xk_rep, prev_rep = x_k.expand(n, 2), x_prev.expand(n, 2)
        mean, log_var = exact_latent_posterior(prev_rep, xk_rep, m, b, c0, s2)
        values, z, recon = negative_elbo(policy, prev_rep, xk_rep, k, mean, log_var, s2, g)
        assert_mc_mean(values, float(nll), "negative ELBO with the exact posterior")
        # the same identity sample by sample: log p(x|z) + log p(z) - log q(z) = log p(x) for the exact posterior
        log_prior = diagonal_normal_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
        per_sample = -(recon + log_prior - diagonal_normal_log_density(z, mean, log_var))
        torch.testing.assert_close(per_sample, nll.expand(n), rtol=1e-9, atol=1e-9)

        other_mean, other_log_var = mean + torch.tensor([0.5, -0.3], dtype=F64), log_var + math.log(2.0)
        gap = kl_divergence(Independent(Normal(other_mean[0], (0.5 * other_log_var[0]).exp()), 1),
                            Independent(Normal(mean[0], (0.5 * log_var[0]).exp()), 1))
        worse, _, _ = negative_elbo(policy, prev_rep, xk_rep, k, other_mean, other_log_var, s2, g)
        assert float(gap) > 0.1
        assert_mc_mean(worse, float(nll + gap), "negative ELBO with an inexact encoder")
        assert float(worse.mean()) > float(nll) + 0.5 * float(gap)

    doubled = forward_kl_bound(recon, mean, log_var, torch.full((n,), 2.0, dtype=F64))
    torch.testing.assert_close(doubled, 2 * values, rtol=1e-12, atol=0)  # lambda_k multiplies the whole bound


class ExactPosteriorEncoder(nn.Module):
    """q_psi = the exact p(z | x_{k-1}, x_k) of the linear case, per sample's level (one dummy parameter, so the
    algorithm's optimiser has something to hold)."""

    def __init__(self, policy: PosteriorSamplingPolicy, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.policy, self.a, self.b = [policy], a, b  # a list: not registered as a submodule
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x_prev, x_k, levels):
        mean = torch.empty(x_prev.shape, dtype=F64)
        log_var = torch.empty(x_prev.shape, dtype=F64)
        for k in levels.unique().tolist():
            rows = levels == k
            m, _, c0, s2 = linear_marginal(self.policy[0], self.a, self.b, k)
            mean[rows], log_var[rows] = exact_latent_posterior(x_prev[rows], x_k[rows], m, self.b, c0, s2)
        return mean, log_var


def test_algorithm_weights_the_forward_kl_term_by_the_level_of_x_k():
    """DDAEBM.forward_kl_term on real pairs at levels 2 and 3 with the exact encoder: the batch mean of
    lambda(t'_k) (-log p_phi(x_{k-1} | x_k)), lambda from (w, w_mid) = (0.6, 0.2) at the time t'_k of x_k (Eq. 21's
    lambda(t-1) = w t'(t)^..., the official code's weight[t + 1])."""
    policy, a, b = linear_case()
    network = QuadraticLevelEnergy(1.0)
    energy = TimeEnergy(network, 4, GradStep([(network.parameters(), 1e-3)]))
    algorithm = DDAEBM(policy, energy, ExactPosteriorEncoder(policy, a, b), forward_kl_w=0.6, forward_kl_w_mid=0.2)
    times = vp_sde_times(4)
    n = 100_000
    pairs = {2: (torch.tensor([0.3, -1.2], dtype=F64), torch.tensor([1.0, 0.4], dtype=F64)),
             3: (torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([-2.0, 1.5], dtype=F64))}
    levels = torch.tensor([2, 3]).repeat_interleave(n // 2)
    x_k = torch.cat([pairs[k][0].expand(n // 2, 2) for k in (2, 3)])
    x_prev = torch.cat([pairs[k][1].expand(n // 2, 2) for k in (2, 3)])
    term = algorithm.forward_kl_term(x_prev, x_k, levels, seeded(10))
    expected, variance = 0.0, 0.0
    g = seeded(11)
    for k in (2, 3):
        weight = 0.6 * float(times[k]) ** math.log(0.2 / 0.6, 0.5)
        m, sigma, c0, s2 = linear_marginal(policy, a, b, k)
        assert float(s2) > algorithm.recon_min_variance  # the clamp is inactive at these levels
        nll = -MultivariateNormal(m @ pairs[k][0], sigma).log_prob(pairs[k][1])
        expected += 0.5 * weight * float(nll)
        # the per-sample spread of the same estimator, for the tolerance
        xk_rep, prev_rep = pairs[k][0].expand(n // 2, 2), pairs[k][1].expand(n // 2, 2)
        values, _, _ = negative_elbo(policy, prev_rep, xk_rep, k, *exact_latent_posterior(prev_rep, xk_rep, m, b, c0, s2),
                                     s2, g)
        variance += (0.5 * weight) ** 2 * float(values.var()) / (n // 2)
    assert abs(float(term) - expected) <= 5 * math.sqrt(variance), (float(term), expected, math.sqrt(variance))


# ---- 6. L1's entropy identity (Eq. 14 and its appendix) ------------------------------------------------------------
def test_joint_entropy_of_latent_and_step_does_not_depend_on_the_generator():
    """H[p_phi(x_{k-1}, z | x_k)] = H[z] + H[x_{k-1} | z, x_k] = d/2 log(2 pi e) + D/2 log(2 pi e s_k^2) for any G:
    estimated from `transition` samples with s_k^2 taken from `ddpm_posterior` (not the policy's buffers)."""
    schedule = vp_sde_schedule(4)
    variance = ddpm_posterior(schedule).variance  # [T + 1], by level
    n = 100_000
    g = seeded(4)
    for generator in (TanhGenerator(), CubicGenerator()):
        policy = PosteriorSamplingPolicy(generator, (2,), schedule, latent_dim=2)
        x_k = 1.5 * torch.randn((n, 2), generator=g, dtype=F64)
        levels = torch.randint(2, 5, (n,), generator=g)  # levels >= 2: s_k > 0
        z = torch.randn((n, 2), generator=g, dtype=F64)
        x_prev, _ = policy.transition(x_k, levels, z, torch.randn((n, 2), generator=g, dtype=F64))
        s2 = variance[levels]  # [N]
        log_joint = diagonal_normal_log_density(z, torch.zeros_like(z), torch.zeros_like(z)) \
            + gaussian_log_density(x_prev, policy.posterior_mean(x_k, levels, generator(x_k, z, levels)), s2)
        closed = 0.5 * 2 * LOG_2PI_E + 0.5 * 2 * (LOG_2PI_E + s2.log())  # [N], per sample's level
        assert_mc_mean(-log_joint - closed, 0.0, f"joint entropy with {type(generator).__name__}")


def test_entropy_part_of_l1_is_minus_the_step_entropy_with_the_exact_encoder():
    """E[-log q_psi(z | x_{k-1}, x_k)] - H[x_{k-1}, z | x_k] = H[z | x_{k-1}, x_k] - H[x_{k-1}, z | x_k]
    = -H[x_{k-1} | x_k] when q_psi is the exact posterior: -1/2 log det(2 pi e (c0^2 B B^T + s^2 I)) in the linear case."""
    policy, a, b = linear_case()
    k, n = 3, 100_000
    m, sigma, c0, s2 = linear_marginal(policy, a, b, k)
    g = seeded(5)
    x_k = torch.tensor([0.7, -0.4], dtype=F64).expand(n, 2)
    levels = torch.full((n,), k)
    z = torch.randn((n, 2), generator=g, dtype=F64)
    x_prev, x0 = policy.transition(x_k, levels, z, torch.randn((n, 2), generator=g, dtype=F64))
    mean, log_var = exact_latent_posterior(x_prev, x_k, m, b, c0, s2)
    neg_log_q = -diagonal_normal_log_density(z, mean, log_var)  # [N]
    neg_log_joint = -(diagonal_normal_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
                      + gaussian_log_density(x_prev, policy.posterior_mean(x_k, levels, x0.double()), s2))
    step_entropy = MultivariateNormal(m @ x_k[0], sigma).entropy()
    assert float(step_entropy) == pytest.approx(0.5 * float(torch.logdet(2 * math.pi * math.e * sigma)), rel=1e-12)
    assert_mc_mean(neg_log_q - neg_log_joint, -float(step_entropy), "the entropy part of L1")
    # and the joint entropy itself, as in the test above
    assert_mc_mean(neg_log_joint, LOG_2PI_E + (LOG_2PI_E + float(s2.log())), "H[x_{k-1}, z | x_k]")


# ---- 7. the posterior-sampling chain ---------------------------------------------------------------------------
def test_chain_from_a_fixed_prediction_has_the_forward_marginals_relative_to_level_0():
    """G = c: starting from q(x_T | x_0 = c), each state x_t (level k = T - t) is N(sqrt(abar'_k) c, (1 - abar'_k) I)
    and the last state is c exactly (level 1's posterior variance is 0).

    `ddpm_posterior` conditions on x_0 = level 0 itself (DDGAN: the cumulative products restart after beta_0), so
    abar'_k = prod_{i=1..k} (1 - beta_i) = alpha_bars[k] / alpha_bars[0], not the schedule's alpha_bars[k] (which
    includes level 0's own noise beta_0). A large eps_small makes the difference visible."""
    schedule = vp_sde_schedule(4, eps_small=0.3)
    steps = schedule.num_steps
    abar = schedule.alpha_bars / schedule.alpha_bars[0]  # [T + 1] by level, abar[0] = 1
    c = torch.tensor([0.5, -1.25])  # exact in float32
    policy = PosteriorSamplingPolicy(ConstantGenerator(c), (2,), schedule, latent_dim=2)
    n = 100_000
    g = seeded(6)
    start = abar[steps].sqrt() * c.double() + (1 - abar[steps]).sqrt() * torch.randn((n, 2), generator=g, dtype=F64)
    trajectory = policy.sample(n, generator=g, x0=start.float())
    assert isinstance(trajectory, Trajectory) and trajectory.log_probs is None
    assert trajectory.states.shape == (steps + 1, n, 2)
    torch.testing.assert_close(trajectory.sigmas, policy.posterior_std)
    for t in range(steps):
        level = steps - t
        x = trajectory.states[t].double()
        mean = abar[level].sqrt() * c.double()
        for dim in range(2):
            assert_mc_mean(x[:, dim], float(mean[dim]), f"mean of level {level}, dim {dim}")
            assert_mc_mean((x[:, dim] - mean[dim]) ** 2, float(1 - abar[level]), f"variance of level {level}")
    assert torch.equal(trajectory.states[-1], c.expand(n, 2))  # level 0: x0_hat itself, no noise
    # the schedule's own alpha_bars (with level 0's noise) are not the chain's marginals: level 1's mean is off
    x1 = trajectory.states[steps - 1][:, 0].double()
    naive = float(schedule.alpha_bars[1].sqrt() * c[0])
    assert abs(float(x1.mean()) - naive) > 20 * float(x1.std()) / math.sqrt(n)


def test_policy_buffers_agree_with_the_schedule_posterior():
    schedule = vp_sde_schedule(4)
    posterior = ddpm_posterior(schedule)
    policy = PosteriorSamplingPolicy(ConstantGenerator(torch.zeros(2)), (2,), schedule, latent_dim=2)
    torch.testing.assert_close(policy.coef_x0, posterior.coef_x0.float())
    torch.testing.assert_close(policy.coef_xk, posterior.coef_xk.float())
    for level in range(1, 5):  # posterior_std is by chain step t = T - k
        assert float(policy.posterior_std[4 - level]) ** 2 == pytest.approx(float(posterior.variance[level]), abs=1e-7)
    assert float(policy.coef_x0[1]) == 1.0 and float(policy.coef_xk[1]) == 0.0 and float(policy.sigma()[-1]) == 0.0


def test_posterior_sampling_policy_interface_and_z0_ablation():
    schedule = vp_sde_schedule(4)
    policy = PosteriorSamplingPolicy(TanhGenerator(), (2,), schedule, latent_dim=2)
    x, t = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="implicit policy"):
        policy.log_prob(x, x, t)
    with pytest.raises(NotImplementedError, match="implicit policy"):
        policy.entropy(t)
    with pytest.raises(NotImplementedError, match="implicit policy"):
        policy.mean(x, t)
    with pytest.raises(ValueError, match="x0 has shape"):
        policy.sample(3, x0=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="latent_dim"):
        PosteriorSamplingPolicy(TanhGenerator(), (2,), schedule, latent_dim=-1)

    seen: list[tuple[int, ...]] = []

    class NoLatent(nn.Module):
        def forward(self, x, z, levels):
            seen.append(tuple(z.shape))
            return 0.5 * x

    ablation = PosteriorSamplingPolicy(NoLatent(), (2,), schedule, latent_dim=0)
    trajectory = ablation.sample(7, generator=seeded(7))
    assert trajectory.states.shape == (5, 7, 2) and trajectory.log_probs is None
    assert seen == [(7, 0)] * 4 and bool(torch.isfinite(trajectory.states).all())
    # z = 0: x_{k-1} = c0 0.5 x_k + ck x_k + s eps, a Gaussian step; the last one is deterministic
    torch.testing.assert_close(trajectory.states[-1], 0.5 * trajectory.states[-2])


# ---- 8. forward pairs: what test_schedules.py leaves out ------------------------------------------------------------
def test_forward_pairs_per_sample_levels_on_images():
    """Mixed levels 1..T in one batch of [B, 1, 2, 2] data: x_{k-1} ~ N(sqrt(alpha_bar_{k-1}) x, 1 - alpha_bar_{k-1})
    per sample's own level (level 1's partner is level 0, noised by beta_0), x_k - sqrt(1 - beta_k) x_{k-1} has
    variance beta_k and is uncorrelated with x_{k-1}; levels above T raise."""
    schedule = vp_sde_schedule(4)
    pattern = torch.tensor([[0.8, -0.5], [0.3, 1.0]], dtype=F64).view(1, 1, 2, 2)
    n = 160_000
    levels = torch.arange(n) % 4 + 1
    previous, current = forward_pairs(pattern.expand(n, 1, 2, 2), levels, schedule, seeded(8))
    assert previous.shape == current.shape == (n, 1, 2, 2) and previous.dtype == F64
    for level in range(1, 5):
        rows = levels == level
        abar = schedule.alpha_bars[level - 1]
        prev = previous[rows].flatten(1)  # [n / T, 4]
        mean = (abar.sqrt() * pattern).flatten()
        for pixel in range(4):
            assert_mc_mean(prev[:, pixel], float(mean[pixel]), f"level {level} previous, pixel {pixel}")
        assert_mc_mean(((prev - mean) ** 2).flatten(), float(1 - abar), f"level {level} previous variance")
        beta = schedule.betas[level]
        residual = current[rows].flatten(1) - (1 - beta).sqrt() * prev
        assert_mc_mean(residual.flatten(), 0.0, f"level {level} residual mean")
        assert_mc_mean(residual.pow(2).flatten(), float(beta), f"level {level} residual variance")
        assert_mc_mean((residual * (prev - mean)).flatten(), 0.0, f"level {level} residual covariance")
    with pytest.raises(ValueError, match="levels must be in 1..4"):
        forward_pairs(pattern.expand(2, 1, 2, 2), torch.tensor([4, 5]), schedule)


def test_the_gaussian_base_measure_adds_exactly_its_log_density_and_makes_the_energy_fall_far_out():
    from rewardtune.rewards.time_energy import TimeEnergyMLP, build_time_energy_reward

    torch.manual_seed(0)
    plain = TimeEnergyMLP(2)
    based = TimeEnergyMLP(2, base_std=1.5)
    based.load_state_dict(plain.state_dict())  # same f; the base has no parameters
    x, levels = torch.randn(64, 2) * 3, torch.randint(0, 5, (64,))
    torch.testing.assert_close(based(x, levels), plain(x, levels) - x.pow(2).sum(1) / (2 * 1.5**2))
    ray = torch.tensor([[1.0, 0.5]]) * torch.logspace(1, 4, 8).unsqueeze(1)  # a ray out to |x| ~ 1e4
    assert bool((based(ray, torch.zeros(8, dtype=torch.long)).diff() < 0).all())  # exp(E) is normalisable
    for bad, match in (({"base_std": -1.0}, "base_std must be >= 0"),
                       ({"network": "unet", "base_std": 1.0}, "base_std is for network")):
        with pytest.raises(ValueError, match=match):
            build_time_energy_reward((2,) if "unet" not in bad.values() else (1, 8, 8), 4, **bad)
