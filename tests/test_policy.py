"""Tests of the Gaussian-chain policy (backbones/base.py) and the DDPM/DDIM schedules (backbones/schedules.py).

Time convention: t = 0 is noise, t = T is the sample; log-probs and entropies are sums over the event dimensions.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import LinearPolicy
from torch import nn
from torch.distributions import Normal

from rewardtune.backbones.epsilon import EpsilonChainPolicy
from rewardtune.backbones.schedules import (
    ddim_transition,
    ddpm_alphas_cumprod,
    strided_ddpm_schedule,
    strided_timesteps,
)
from rewardtune.types import Trajectory


def make_policy(sample_shape=(3,), T=3, *, seed=0, learn_mean=False, **kw) -> LinearPolicy:
    g = torch.Generator().manual_seed(seed)
    a = 0.5 + torch.rand(T, generator=g)
    b = torch.randn(T, *sample_shape, generator=g)
    sigma = 0.2 + torch.rand(T, generator=g)
    return LinearPolicy(sample_shape, a, b, sigma, learn_mean=learn_mean, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# log_prob / entropy / sampled log-probs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample_shape", [(1,), (3,), (2, 3)])
def test_log_prob_matches_torch_normal(sample_shape):
    policy = make_policy(sample_shape, T=4).double()
    g = torch.Generator().manual_seed(1)
    B = 64
    x = torch.randn(B, *sample_shape, generator=g, dtype=torch.float64)
    x_next = 2 * torch.randn(B, *sample_shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, policy.num_steps, (B,), generator=g)
    got = policy.log_prob(x_next, x, t)
    sigma = policy.sigma()[t].view(-1, *([1] * len(sample_shape)))
    expected = Normal(policy.mean(x, t), sigma.expand_as(x)).log_prob(x_next).flatten(1).sum(-1)
    assert got.shape == (B,)
    # float64 on both sides, same formula up to summation order: agreement to ~1e-15 relative.
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sample_shape", [(1,), (3,), (2, 3)])
def test_entropy_matches_torch_normal(sample_shape):
    policy = make_policy(sample_shape, T=4).double()
    t = torch.tensor([0, 1, 2, 3, 3, 0])
    sigma = policy.sigma()[t].view(-1, *([1] * len(sample_shape)))
    loc = torch.zeros(len(t), *sample_shape, dtype=torch.float64)
    expected = Normal(loc, sigma.expand_as(loc)).entropy().flatten(1).sum(-1)
    # float64 closed forms on both sides.
    torch.testing.assert_close(policy.entropy(t), expected, rtol=1e-12, atol=1e-12)
    # and it is D log sigma_t + D/2 log(2 pi e) (the paper's Sec. 4.1 expression up to the e inside the log).
    d = math.prod(sample_shape)
    manual = d * policy.sigma()[t].log() + 0.5 * d * math.log(2 * math.pi * math.e)
    torch.testing.assert_close(policy.entropy(t), manual, rtol=1e-12, atol=1e-12)  # same formula, float64


@pytest.mark.parametrize("sample_shape", [(2,), (2, 3)])
def test_sampled_log_probs_equal_recomputed_log_prob(sample_shape):
    policy = make_policy(sample_shape, T=3)
    traj = policy.sample(512, generator=torch.Generator().manual_seed(3))
    assert isinstance(traj, Trajectory)
    assert traj.states.shape == (4, 512, *sample_shape)
    assert traj.log_probs.shape == (3, 512)
    torch.testing.assert_close(traj.sigmas, policy.sigma().detach(), rtol=0, atol=0)  # a copy of the same tensor
    for t in range(3):
        tt = policy.times(t, 512)
        recomputed = policy.log_prob(traj.states[t + 1], traj.states[t], tt)
        # float32: the sampled log-prob uses ||noise||^2, the recomputed one ||x' - mean||^2 / sigma^2; the values
        # are O(10) and the round-off of x' - mean is ~1e-6 relative to |x'| ~ few, so allow 1e-4 absolute.
        torch.testing.assert_close(traj.log_probs[t], recomputed, rtol=1e-5, atol=1e-4)


def test_sample_is_reproducible_with_generator():
    policy = make_policy((2,), T=3)
    t1 = policy.sample(16, generator=torch.Generator().manual_seed(7))
    t2 = policy.sample(16, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(t1.states, t2.states, rtol=0, atol=0)  # same seed, same ops: bitwise equal
    assert not t1.states.requires_grad


def test_sample_with_guide_applies_guide_and_drops_log_probs():
    policy = make_policy((2,), T=3)
    calls = []

    def guide(x, t_next, sigma):
        calls.append((t_next, float(sigma)))
        return x + 1.0

    plain = policy.sample(8, generator=torch.Generator().manual_seed(0))
    guided = policy.sample(8, generator=torch.Generator().manual_seed(0), guide=guide)
    assert guided.log_probs is None
    sig = policy.sigma().detach()
    assert [c[0] for c in calls] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([c[1] for c in calls]), sig, rtol=0, atol=0)  # passed through as is
    # the first guided state is the plain one shifted by 1 (same prior and noise draws)
    torch.testing.assert_close(guided.states[1], plain.states[1] + 1.0, rtol=1e-6, atol=1e-6)  # float32 add


# ---------------------------------------------------------------------------------------------------------------------
# closed-form marginals of a linear-Gaussian chain
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample_shape", [(2,), (2, 2)])
def test_linear_gaussian_chain_marginals(sample_shape):
    T = 3
    a = torch.tensor([0.9, -0.5, 1.2])
    b = torch.stack([torch.full(sample_shape, 0.3), torch.full(sample_shape, -1.0), torch.full(sample_shape, 0.4)])
    b[:, 0] *= -1  # make the offsets differ across dimensions
    sigma = torch.tensor([0.7, 0.3, 0.5])
    policy = LinearPolicy(sample_shape, a, b, sigma)
    N = 200_000
    traj = policy.sample(N, generator=torch.Generator().manual_seed(1234))
    mean = torch.zeros(sample_shape, dtype=torch.float64)
    var = 1.0  # prior N(0, I)
    for t in range(T):
        mean = a[t].double() * mean + b[t].double()
        var = a[t].double() ** 2 * var + sigma[t].double() ** 2
        x = traj.states[t + 1].double().flatten(1)  # [N, D]
        emp_mean = x.mean(0)
        emp_var = x.var(0)
        # Tolerance: 5 standard errors per component. SE(mean) = sqrt(v / N), SE(var) = v sqrt(2 / (N - 1)) for a
        # Gaussian; a 5-sigma deviation has probability ~6e-7 per component, and the seed makes it deterministic.
        torch.testing.assert_close(emp_mean, mean.flatten(), rtol=0, atol=5 * math.sqrt(float(var) / N))
        torch.testing.assert_close(
            emp_var, torch.full_like(emp_var, float(var)), rtol=0, atol=5 * float(var) * math.sqrt(2 / (N - 1))
        )
        # Isotropy: a scalar a_t keeps the dimensions uncorrelated; SE of a sample covariance is ~ v / sqrt(N).
        cov = torch.cov(x.T)
        off = cov - torch.diag(torch.diag(cov))
        torch.testing.assert_close(off, torch.zeros_like(off), rtol=0, atol=5 * float(var) / math.sqrt(N))


# ---------------------------------------------------------------------------------------------------------------------
# gradients of the reparameterised step
# ---------------------------------------------------------------------------------------------------------------------
def test_step_is_differentiable_in_sigma_and_mean_params():
    policy = make_policy((2,), T=3, learn_mean=True).double()
    g = torch.Generator().manual_seed(0)
    B = 10
    x = torch.randn(B, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(B, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    w = torch.randn(B, 2, generator=g, dtype=torch.float64)  # a random linear functional of the output
    loss = (policy.step(x, t, noise) * w).sum()
    loss.backward()
    sigma = policy.sigma().detach()
    exp_log_sigma = torch.zeros(3, dtype=torch.float64)
    exp_a = torch.zeros(3, dtype=torch.float64)
    exp_b = torch.zeros(3, 2, dtype=torch.float64)
    for i in range(B):
        exp_log_sigma[t[i]] += sigma[t[i]] * (noise[i] * w[i]).sum()  # d(sigma noise)/d log sigma = sigma noise
        exp_a[t[i]] += (x[i] * w[i]).sum()
        exp_b[t[i]] += w[i]
    # float64 sums of ten O(1) terms: round-off ~1e-15.
    torch.testing.assert_close(policy.log_sigma.grad, exp_log_sigma, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(policy.a.grad, exp_a, rtol=1e-10, atol=1e-12)  # float64, as above
    torch.testing.assert_close(policy.b.grad, exp_b, rtol=1e-10, atol=1e-12)  # float64, as above
    assert {id(p) for p in policy.network_parameters()} == {id(policy.a), id(policy.b)}
    assert policy.sigma_parameters() == [policy.log_sigma]


def test_fix_last_sigma_blocks_gradient_of_last_sigma():
    policy = make_policy((2,), T=3, fix_last_sigma=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g)
    noise = torch.randn(30, 2, generator=g)
    t = torch.arange(30) % 3
    out = policy.step(x, t, noise).pow(2).sum() + policy.entropy(t).sum() + policy.log_prob(x, x, t).sum()
    out.backward()
    grad = policy.log_sigma.grad
    assert grad is not None
    assert torch.all(grad[:-1].abs() > 1e-3)
    assert grad[-1].item() == 0.0
    # even after the parameter moves, sigma_{T-1} stays at its initial value
    with torch.no_grad():
        policy.log_sigma += 0.5
    torch.testing.assert_close(policy.sigma()[-1], policy.initial_log_sigma[-1].exp(), rtol=0, atol=0)  # same op
    torch.testing.assert_close(
        policy.sigma()[:-1], (policy.initial_log_sigma[:-1] + 0.5).exp(), rtol=1e-6, atol=0
    )  # float32 exp of the same value


def test_learn_sigma_false_has_no_sigma_parameters_and_floor_applies():
    policy = LinearPolicy((2,), torch.ones(2), torch.zeros(2, 2), torch.tensor([0.0, 0.5]), learn_sigma=False)
    assert policy.sigma_parameters() == []
    # the zero initial sigma is clamped to the default floor 1e-3; float32 log/exp round trip.
    torch.testing.assert_close(policy.sigma(), torch.tensor([1e-3, 0.5]), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------------------
def test_strided_timesteps_examples():
    assert strided_timesteps(5).tolist() == [999, 799, 599, 399, 199]
    assert strided_timesteps(1000).tolist() == list(range(999, -1, -1))
    assert strided_timesteps(1).tolist() == [999]
    assert strided_timesteps(4, 8).tolist() == [7, 5, 3, 1]
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            strided_timesteps(bad)


def test_strided_timesteps_are_valid_for_every_T():
    for T in range(1, 1001):
        ts = strided_timesteps(T)
        assert ts.dtype == torch.int64
        assert ts.shape == (T,), T
        assert ts[0] == 999, T
        assert ts[-1] >= 0, T
        assert torch.all(ts[1:] < ts[:-1]), T


@pytest.mark.parametrize("k", [0, 1, 2, 10, 250, 500, 998, 999])
def test_ddim_eta1_one_full_step_is_ddpm_posterior(k):
    alphas_cumprod = ddpm_alphas_cumprod()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_k, beta_k, ab_k = 1 - betas[k], betas[k], alphas_cumprod[k]
    ab_prev = alphas_cumprod[k - 1] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
    coef = ddim_transition(ab_k.view(1), ab_prev.view(1), eta=1.0)
    # DDPM (Ho et al. 2020): mean = (x - beta_k / sqrt(1 - ab_k) eps) / sqrt(alpha_k),
    # variance beta_tilde = (1 - ab_{k-1}) / (1 - ab_k) beta_k.
    exp_a = 1 / alpha_k.sqrt()
    exp_c = -beta_k / ((1 - ab_k).sqrt() * alpha_k.sqrt())
    exp_var = (1 - ab_prev) / (1 - ab_k) * beta_k
    # float64; the only cancellation is 1 - ab near k = 0 (1 - ab_0 = 1e-4), costing ~4 digits of 16.
    torch.testing.assert_close(coef.a, exp_a.view(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(coef.c, exp_c.view(1), rtol=1e-10, atol=0)  # float64, as above
    torch.testing.assert_close(coef.sigma**2, exp_var.view(1), rtol=1e-10, atol=1e-300)  # float64; 0 at k = 0


def test_ddim_eta1_vectorised_over_consecutive_steps():
    ab = ddpm_alphas_cumprod()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    coef = ddim_transition(ab[1:], ab[:-1])
    exp_var = (1 - ab[:-1]) / (1 - ab[1:]) * betas[1:]
    exp_c = -betas[1:] / ((1 - ab[1:]).sqrt() * (1 - betas[1:]).sqrt())
    torch.testing.assert_close(coef.sigma**2, exp_var, rtol=1e-10, atol=0)  # float64 closed forms
    torch.testing.assert_close(coef.c, exp_c, rtol=1e-10, atol=0)  # float64 closed forms
    torch.testing.assert_close(coef.a, 1 / (1 - betas[1:]).sqrt(), rtol=1e-10, atol=0)  # float64 closed forms


@pytest.mark.parametrize("T", [1, 4, 10])
def test_ddim_identity_with_true_noise(T):
    """With eps_theta = the true noise, a x_k + c eps = sqrt(ab_to) x0 + sqrt(1 - ab_to - sigma^2) eps."""
    ab = ddpm_alphas_cumprod()
    timesteps, coef = strided_ddpm_schedule(T, ab)
    ab_from = ab[timesteps.long()]
    ab_to = torch.cat([ab[timesteps.long()[1:]], torch.ones(1, dtype=torch.float64)])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(T, 16, generator=g, dtype=torch.float64)
    eps = torch.randn(T, 16, generator=g, dtype=torch.float64)
    xk = ab_from.sqrt()[:, None] * x0 + (1 - ab_from).sqrt()[:, None] * eps
    got = coef.a[:, None] * xk + coef.c[:, None] * eps
    expected = ab_to.sqrt()[:, None] * x0 + (1 - ab_to - coef.sigma**2).clamp_min(0).sqrt()[:, None] * eps
    # float64; a can be ~ 1 / sqrt(ab_999) ~ 160 so x_k's round-off is amplified to ~1e-13.
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # The chain ends at alpha_bar = 1 with zero noise on the last step.
    assert coef.sigma[-1].item() == 0.0
    torch.testing.assert_close(timesteps, strided_timesteps(T).double(), rtol=0, atol=0)  # same integers


def test_ddim_rejects_wrong_direction_and_eta0_is_deterministic():
    ab = ddpm_alphas_cumprod()
    with pytest.raises(ValueError):
        ddim_transition(ab[10:11], ab[500:501])
    coef = ddim_transition(ab[500:501], ab[10:11], eta=0.0)
    assert coef.sigma.item() == 0.0
    exp_c = (1 - ab[10]).sqrt() - (1 - ab[500]).sqrt() * (ab[10] / ab[500]).sqrt()
    torch.testing.assert_close(coef.c, exp_c.view(1), rtol=1e-12, atol=0)  # float64 closed form, same ops


class _AffineEps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, k):
        return self.w * x + k.view(-1, 1) / 1000


def test_epsilon_chain_policy_mean_and_sigma():
    policy = EpsilonChainPolicy(_AffineEps(), (2,), num_steps=4)
    ab = ddpm_alphas_cumprod()
    timesteps, coef = strided_ddpm_schedule(4, ab)
    # float32 buffers of float64 schedules; the last sigma (exactly 0) is clamped up to the 1e-3 floor.
    torch.testing.assert_close(policy.sigma(), coef.sigma.clamp_min(1e-3).float(), rtol=1e-6, atol=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=g)
    t = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    k = timesteps.float()[t]
    expected = coef.a.float()[t, None] * x + coef.c.float()[t, None] * (0.3 * x + k[:, None] / 1000)
    torch.testing.assert_close(policy.mean(x, t), expected, rtol=1e-5, atol=1e-5)  # float32 arithmetic
    assert set(policy.network_state()) == {"eps_net.w"}
