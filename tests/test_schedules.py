"""FastDPM "VAR" schedule golden values (from the official DxMI code, re-derived in float64; see
shared notes dxmi-official-code-facts.md) and the policy built on it."""

from __future__ import annotations

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
