"""FastDPM "VAR" schedule golden values (from the official DxMI code, re-derived in float64; see
shared notes dxmi-official-code-facts.md) and the policy built on it."""

from __future__ import annotations

import pytest
import torch

from rewardtune.backbones.schedules import (
    continuous_timestep,
    ddpm_alphas_cumprod,
    fastdpm_ddpm_schedule,
    fastdpm_variance_schedule,
)

AC = ddpm_alphas_cumprod()


def test_variance_schedule_saturates_at_the_bisection_bound():
    eta = fastdpm_variance_schedule(10)
    golden = [1e-4, 0.011025, 0.04, 0.087025, 0.1521, 0.235225, 0.3364, 0.455625, 0.5929, 0.748225]
    # eta_i = 1e-4 (1 + 9.5 i)^2 exactly (x = 0.95 / (sqrt(1e-4) * 10)); bisection converges to 1e-12 in x.
    torch.testing.assert_close(eta, torch.tensor(golden, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    for steps, x in ((5, 19.0), (4, 23.75)):
        i = torch.arange(steps, dtype=torch.float64)
        torch.testing.assert_close(fastdpm_variance_schedule(steps), 1e-4 * (1 + i * x) ** 2, rtol=1e-9, atol=1e-12)


def test_fastdpm_timesteps_and_sigmas_match_the_official_values():
    golden = {
        10: ([616.7, 494.0, 394.1, 308.9, 234.9, 170.3, 114.4, 66.9, 28.3, 0.0],
             [0.8372, 0.7177, 0.5987, 0.4847, 0.3773, 0.2765, 0.1819, 0.0937, 0.0100]),
        5: ([384.0, 243.0, 138.3, 58.7, 0.0], None),
        4: ([321.9, 176.9, 74.3, 0.0], [0.4735, 0.2262, 0.0100]),
    }
    for steps, (timesteps, sigmas) in golden.items():
        k, coef = fastdpm_ddpm_schedule(steps, AC)
        # golden values are quoted to 0.1 step / 1e-4; the official code maps levels to steps with a Stirling
        # approximation where we interpolate log alpha_bar, which agrees to well under 0.1 step.
        torch.testing.assert_close(k, torch.tensor(timesteps, dtype=torch.float64), rtol=0, atol=0.06)
        if sigmas is not None:  # the last step is deterministic in the schedule (sigma 0, floored by the policy)
            torch.testing.assert_close(coef.sigma[:-1], torch.tensor(sigmas, dtype=torch.float64), rtol=0, atol=6e-5)
            assert float(coef.sigma[-1]) == 0.0


def test_continuous_timestep_inverts_alpha_bar_at_integers():
    k = torch.tensor([0, 1, 57, 500, 998], dtype=torch.float64)
    # exact at integer steps up to float64 rounding of the linear interpolation
    torch.testing.assert_close(continuous_timestep(AC[k.long()], AC), k, rtol=0, atol=1e-9)


# ---- the VP-SDE discretisation of DDGAN / DDAEBM --------------------------------------------------------------------
def test_vp_sde_levels_follow_the_closed_form_marginals():
    """alpha_bar_k = prod (1 - beta_i) equals exp(-t'^2 (b_max - b_min) / 2 - t' b_min) at t'_k = eps + (1 - eps) k / T,
    and beta_0 is the variance of level 0 itself."""
    import math

    from rewardtune.backbones.schedules import vp_sde_schedule, vp_sde_times

    for beta_min, beta_max, steps in ((0.1, 20.0, 4), (0.01, 0.1, 4), (0.1, 20.0, 1), (0.1, 20.0, 8)):
        schedule = vp_sde_schedule(steps, beta_min, beta_max)
        times = vp_sde_times(steps)
        assert schedule.num_steps == steps and math.isclose(float(times[0]), 1e-3) and float(times[-1]) == 1.0
        closed = torch.exp(-0.5 * times**2 * (beta_max - beta_min) - times * beta_min)
        torch.testing.assert_close(schedule.alpha_bars, closed, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(schedule.betas[0], 1 - closed[0])
    # CIFAR-10, T = 4: the last level is almost pure noise
    assert float(vp_sde_schedule(4).alpha_bars[-1]) < 1e-4
    lsun = vp_sde_times(4, spacing="lsun")  # k floor(500 / (T - 1)) / 999, then 1
    torch.testing.assert_close(lsun, torch.tensor([0.0, 166 / 999, 332 / 999, 498 / 999, 1.0], dtype=torch.float64))
    clamped = vp_sde_schedule(4, spacing="lsun", max_beta=0.999)
    assert float(clamped.betas.max()) <= 0.999
    torch.testing.assert_close(clamped.alpha_bars, torch.cumprod(1 - clamped.betas, 0))


def test_the_posterior_is_the_gaussian_conditional_and_diffusers_ddpm_step():
    """q(x_{k-1} | x_k, x_0) from Gaussian conditioning of the joint (x_{k-1}, x_k | x_0), and the same coefficients
    as diffusers' DDPMScheduler on that schedule."""
    from diffusers import DDPMScheduler

    from rewardtune.backbones.schedules import ddpm_posterior, vp_sde_schedule

    schedule = vp_sde_schedule(4)
    posterior = ddpm_posterior(schedule)
    betas = schedule.betas[1:]
    abar = torch.cumprod(1 - betas, 0)
    for k in range(1, 5):
        prev = abar[k - 2] if k > 1 else torch.tensor(1.0, dtype=torch.float64)
        # x_{k-1} = sqrt(prev) x0 + sqrt(1 - prev) e1;  x_k = sqrt(1 - b_k) x_{k-1} + sqrt(b_k) e2
        cov = (1 - betas[k - 1]).sqrt() * (1 - prev)  # Cov(x_{k-1}, x_k | x0)
        var_k = 1 - abar[k - 1]
        coef_xk = cov / var_k
        coef_x0 = prev.sqrt() - coef_xk * abar[k - 1].sqrt()
        variance = (1 - prev) - cov**2 / var_k
        torch.testing.assert_close(posterior.coef_xk[k], coef_xk)
        torch.testing.assert_close(posterior.coef_x0[k], coef_x0)
        torch.testing.assert_close(posterior.variance[k], variance.clamp_min(0), atol=1e-12, rtol=1e-9)
    scheduler = DDPMScheduler(num_train_timesteps=4, trained_betas=betas.tolist(), clip_sample=False,
                              prediction_type="sample")  # the network predicts x_0, as DDAEBM's generator does
    scheduler.set_timesteps(4)
    x0, xk = torch.randn(3, 2), torch.randn(3, 2)
    for k in range(1, 5):  # diffusers' 0-based step k - 1 is the transition x_k -> x_{k-1}
        got = scheduler.step(x0, k - 1, xk, generator=torch.Generator().manual_seed(k)).prev_sample
        noise = torch.randn(xk.shape, generator=torch.Generator().manual_seed(k)) if k > 1 else torch.zeros_like(xk)
        expected = (posterior.coef_x0[k] * x0.double() + posterior.coef_xk[k] * xk.double()
                    + posterior.variance[k].sqrt() * noise.double())
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_forward_pairs_have_the_forward_process_moments():
    from rewardtune.backbones.schedules import forward_pairs, vp_sde_schedule

    schedule = vp_sde_schedule(4)
    x = torch.full((200000, 1), 0.8, dtype=torch.float64)
    levels = torch.full((200000,), 3)
    previous, current = forward_pairs(x, levels, schedule, torch.Generator().manual_seed(0))
    abar = schedule.alpha_bars
    assert abs(float(previous.mean()) - 0.8 * float(abar[2].sqrt())) < 0.01
    assert abs(float(previous.var()) - float(1 - abar[2])) < 0.01
    assert abs(float(current.mean()) - 0.8 * float(abar[3].sqrt())) < 0.01  # the pair's second is level k's marginal
    assert abs(float(current.var()) - float(1 - abar[3])) < 0.01
    residual = current - (1 - schedule.betas[3]).sqrt() * previous  # x_k | x_{k-1}: the step's own noise
    assert abs(float(residual.var()) - float(schedule.betas[3])) < 0.01
    with pytest.raises(ValueError):
        forward_pairs(x[:2], torch.tensor([0, 1]), schedule)
