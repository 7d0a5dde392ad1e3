"""The exact diffused-GMM harness and the score-SDE solvers: exact scores against autograd, the SDEs' moment
equations, solver convergence orders on a Gaussian (linear) case, and guidance by the exact log-ratio gradient turning
one mixture's sampler into the other's."""

from __future__ import annotations

import math

import pytest
import torch

from rewardtune.score_sde.gmm import (
    DiffusedGMM,
    gradient_mse,
    log_ratio,
    log_ratio_gradient,
    mode_masses,
)
from rewardtune.score_sde.sdes import make_sde, transition_kernel
from rewardtune.score_sde.solvers import (
    euler_maruyama,
    guided_score,
    ode_euler,
    ode_heun,
    restart,
    time_grid,
)

SDES = {"vp": {}, "subvp": {}, "ve": {"sigma_min": 0.01, "sigma_max": 5.0}}


def mixture(sde, weights=(0.5, 0.3, 0.2)) -> DiffusedGMM:
    means = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.0]])
    a = torch.tensor([[0.3, 0.1], [0.1, 0.2]])
    covs = torch.stack([a, 0.5 * torch.eye(2), torch.tensor([[0.2, -0.05], [-0.05, 0.1]])])
    return DiffusedGMM(torch.tensor(weights), means, covs, sde)


@pytest.mark.parametrize("kind", SDES)
@pytest.mark.parametrize("t", [1e-3, 0.1, 0.5, 1.0])
def test_the_exact_score_is_the_gradient_of_the_exact_log_density(kind, t):
    gmm = mixture(make_sde(kind, **SDES[kind]))
    x = gmm.sample(64, t, torch.Generator().manual_seed(0)).requires_grad_(True)
    (autograd,) = torch.autograd.grad(gmm.log_prob(x, t).sum(), x)
    assert torch.allclose(gmm.score(x.detach(), t), autograd, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", SDES)
def test_alpha_and_sigma_solve_the_linear_sdes_moment_equations(kind):
    """For dx = a(t) x dt + g dw: alpha' = a alpha and (sigma^2)' = 2 a sigma^2 + g^2, with alpha(0) = 1, sigma(0) = 0."""
    sde = make_sde(kind, **SDES[kind])
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    d_alpha = (sde.alpha(t + h) - sde.alpha(t - h)) / (2 * h)
    d_var = (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    a, g2 = sde.drift_coefficient(t), sde.diffusion_squared(t)
    assert torch.allclose(d_alpha, a * sde.alpha(t), rtol=1e-6)
    assert torch.allclose(d_var, 2 * a * sde.sigma(t) ** 2 + g2, rtol=1e-5)
    zero = torch.zeros((), dtype=torch.float64)
    assert float(sde.alpha(zero)) == 1.0 and float(sde.sigma(zero)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind", SDES)
def test_the_transition_kernels_compose(kind):
    sde = make_sde(kind, **SDES[kind])
    s, u, t = (torch.tensor(v, dtype=torch.float64) for v in (0.1, 0.4, 0.8))
    m_su, v_su = transition_kernel(sde, s, u)
    m_ut, v_ut = transition_kernel(sde, u, t)
    m_st, v_st = transition_kernel(sde, s, t)
    assert torch.allclose(m_ut * m_su, m_st) and torch.allclose(m_ut**2 * v_su + v_ut, v_st)
    zero = torch.zeros((), dtype=torch.float64)
    m0, v0 = transition_kernel(sde, zero, t)  # from the data: the marginal kernel
    assert torch.allclose(m0, sde.alpha(t)) and torch.allclose(v0, sde.sigma(t) ** 2)


def gaussian_flow_endpoint(sde, x_start: torch.Tensor, mean: float, var: float, t0, t1) -> torch.Tensor:
    """The exact PF-ODE map of 1-D Gaussian data N(mean, var): (x - alpha_t mean) / sd_t is constant along the flow."""
    def sd(t):
        return (sde.alpha(t) ** 2 * var + sde.sigma(t) ** 2).sqrt()

    return sde.alpha(t1) * mean + (x_start - sde.alpha(t0) * mean) * sd(t1) / sd(t0)


@pytest.mark.parametrize(("solver", "order"), [(ode_euler, 1), (ode_heun, 2)])
def test_euler_is_first_order_and_heun_second_order_on_a_gaussian(solver, order):
    sde = make_sde("vp")
    gmm = DiffusedGMM(torch.ones(1), torch.tensor([[0.7]]), torch.tensor([0.25]), sde)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    t0, t1 = 1.0, 0.05
    exact = gaussian_flow_endpoint(sde, x, 0.7, 0.25, torch.tensor(t0, dtype=torch.float64), torch.tensor(t1, dtype=torch.float64))
    errors = [float((solver(sde, gmm.score, x, time_grid(n, t1, t0)) - exact).abs().max()) for n in (40, 80, 160)]
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(abs(math.log2(r) - order) < 0.2 for r in ratios), (errors, ratios)


def test_euler_maruyama_and_restart_sample_the_diffused_marginal_with_the_exact_score():
    sde = make_sde("vp")
    gmm = DiffusedGMM(torch.ones(1), torch.tensor([[0.7, -0.3]]), torch.tensor([[0.25, 0.04]]), sde)
    n, t_end = 5000, 0.02
    start = gmm.sample(n, 1.0, torch.Generator().manual_seed(0))
    exact_mean, exact_cov = gmm.components(t_end)
    em = euler_maruyama(sde, gmm.score, start, time_grid(250, t_end), torch.Generator().manual_seed(1))
    times = time_grid(60, t_end)
    rs = restart(sde, gmm.score, start, times, t_min=float(times[45]), t_max=0.6, restarts=2, restart_steps=20,
                 generator=torch.Generator().manual_seed(2))
    for samples in (em, rs):
        sd = exact_cov.diagonal(dim1=-2, dim2=-1)[0].sqrt()
        assert torch.allclose(samples.mean(0), exact_mean[0], atol=5 * float(sd.max()) / math.sqrt(n) + 0.01)
        assert torch.allclose(samples.std(0), sd, rtol=0.05)


def test_guidance_by_the_exact_log_ratio_gradient_turns_the_model_into_the_target():
    """The thesis's harness: the model q misses mass on one mode of the target p; q's score plus grad log(p_t / q_t)
    is p's score, so the guided sampler recovers the mode (while q's own sampler does not)."""
    sde = make_sde("subvp")
    p = mixture(sde, (0.4, 0.3, 0.3))
    q = mixture(sde, (0.6, 0.38, 0.02))  # mode 2 almost missing
    start = p.sample(2500, 1.0, torch.Generator().manual_seed(0))
    times = time_grid(40, 1e-3)
    guided = guided_score(q.score, lambda x, t: log_ratio_gradient(p, q, x, t))
    plain_masses = mode_masses(p, ode_heun(sde, q.score, start, times))
    guided_masses = mode_masses(p, ode_heun(sde, guided, start, times))
    assert torch.allclose(guided_masses, p.weights, atol=0.04)
    assert float(plain_masses[2]) < 0.1
    x = p.sample(500, 0.3, torch.Generator().manual_seed(3))
    assert gradient_mse(lambda y: log_ratio_gradient(p, q, y, 0.3), lambda y: guided(y, torch.tensor(0.3)) - q.score(y, 0.3), x) < 1e-10
    assert gradient_mse(lambda y: log_ratio_gradient(p, q, y, 0.3), lambda y: torch.zeros_like(y), x) > 0.01
    assert torch.allclose(log_ratio(p, p, x, 0.3), torch.zeros(500, dtype=torch.float64))


def test_exact_samples_have_the_mixture_weights_as_mode_masses():
    gmm = mixture(make_sde("vp"))
    x = gmm.sample(20000, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(mode_masses(gmm, x), gmm.weights, atol=0.015)


def test_a_guidance_window_leaves_the_score_alone_outside_it():
    score = guided_score(lambda x, t: x, lambda x, t: torch.ones_like(x), weight=lambda t: 2 * float(t), window=(0.2, 0.5))
    x = torch.zeros(3, 2, dtype=torch.float64)
    assert torch.equal(score(x, torch.tensor(0.1)), x) and torch.allclose(score(x, torch.tensor(0.25)), x + 0.5)


def test_bad_mixtures_and_grids_are_value_errors():
    sde = make_sde("vp")
    with pytest.raises(ValueError, match="weights"):
        DiffusedGMM(torch.tensor([1.0, -1.0]), torch.zeros(2, 2), torch.ones(2), sde)
    with pytest.raises(ValueError, match="covariances"):
        DiffusedGMM(torch.ones(2), torch.zeros(2, 2), torch.ones(3), sde)
    with pytest.raises(ValueError, match="unknown SDE"):
        make_sde("vpp")
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="t_min"):
        restart(sde, lambda x, t: x, torch.zeros(1, 1), time_grid(4), t_min=0.33, t_max=0.6, restarts=1, restart_steps=2)


def test_per_sample_times_give_each_row_its_own_times_density_and_score():
    gmm = mixture(make_sde("vp"))
    times = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    x = torch.tensor([[0.5, 0.1], [-1.0, 0.4], [2.0, -1.0]], dtype=torch.float64)
    for i, t in enumerate(times):
        assert torch.allclose(gmm.score(x, times)[i], gmm.score(x[i : i + 1], float(t))[0])
        assert torch.allclose(gmm.log_prob(x, times)[i], gmm.log_prob(x[i : i + 1], float(t))[0])
