"""EDM backbone: Karras grids and ancestral splits against the official DxMI values, and the preconditioned step."""

from __future__ import annotations

import torch
from torch import nn

from rewardtune.backbones.edm import (
    EDMChainPolicy,
    build_edm_backbone,
    edm_preconditioning,
)
from rewardtune.backbones.schedules import ancestral_split, karras_sigmas


def test_karras_grid_golden_values():
    # golden values from the official DxMI sampler, quoted to 3-4 significant digits (shared notes)
    sigmas = karras_sigmas(10, rho=7.0)
    golden = [80, 42.415, 21.109, 9.723, 4.066, 1.502, 0.470, 0.1166, 0.0204, 0.002, 0]
    torch.testing.assert_close(sigmas, torch.tensor(golden, dtype=torch.float64), rtol=1e-3, atol=1e-4)
    up, down = ancestral_split(sigmas)
    golden_up = [35.96, 18.31, 8.63, 3.69, 1.396, 0.446, 0.113, 0.0201, 0.002, 0]
    torch.testing.assert_close(up, torch.tensor(golden_up, dtype=torch.float64), rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(up**2 + down**2, sigmas[1:] ** 2, rtol=1e-12, atol=1e-15)  # exact split, float64
    sigmas4 = karras_sigmas(4, rho=4.0, stochastic_last=True)
    torch.testing.assert_close(sigmas4, torch.tensor([80, 27.785, 6.571, 0.6746, 0.002], dtype=torch.float64), rtol=1e-3, atol=1e-4)
    up4, _ = ancestral_split(sigmas4)
    torch.testing.assert_close(up4, torch.tensor([26.06, 6.385, 0.671, 0.002], dtype=torch.float64), rtol=1e-3, atol=1e-4)


class Zero(nn.Module):
    def forward(self, x, c_noise):
        return torch.zeros_like(x)


class Recording(nn.Module):
    """F(u, c) = 2 u + c (c broadcast per sample), keeping its inputs."""

    def forward(self, x, c_noise):
        self.seen = (x.detach().clone(), c_noise.detach().clone())
        return 2 * x + c_noise.view(-1, *([1] * (x.dim() - 1)))


def test_denoiser_preconditioning_matches_edm_table_1():
    """D(x; s) = c_skip x + c_out F(c_in x, c_noise) with sigma_data = 0.5 (EDM, Table 1, written out here rather than
    read from edm_preconditioning), and the network sees c_in x and c_noise = 0.25 ln s (the DxMI/EDM convention)."""
    net = Recording()
    policy = EDMChainPolicy(net, (3,), num_steps=4, rho=4.0)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.tensor([80.0, 10.0, 1.0, 0.5, 0.002], dtype=torch.float64)
    got = policy.double().denoise(x, s)
    total = s**2 + 0.25
    c_in, c_noise = 1 / total.sqrt(), 0.25 * torch.log(s)
    u = c_in[:, None] * x
    expected = (0.25 / total)[:, None] * x + (0.5 * s / total.sqrt())[:, None] * (2 * u + c_noise[:, None])
    torch.testing.assert_close(net.seen[0], u, rtol=1e-12, atol=0)  # float64 throughout
    torch.testing.assert_close(net.seen[1], c_noise, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_step_mean_with_a_known_denoiser():
    policy = EDMChainPolicy(Zero(), (2,), num_steps=4, rho=4.0, stochastic_last=True)
    x = torch.randn(6, 2, dtype=torch.float32)
    t = torch.tensor([0, 1, 2, 3, 0, 3])
    sigma = policy.sigmas[t]
    c_skip, _, _ = edm_preconditioning(sigma)
    # F = 0 gives D = c_skip x, so mean = x + (x - c_skip x) / sigma * (sigma_down - sigma)
    expected = x + ((1 - c_skip) / sigma * (policy.sigma_down[t] - sigma))[:, None] * x
    torch.testing.assert_close(policy.mean(x, t), expected, rtol=1e-5, atol=1e-5)  # float32 arithmetic
    # learnable noise starts at sigma_up; the prior has std sigma_max
    torch.testing.assert_close(policy.sigma(), torch.tensor([26.0551, 6.385, 0.671, 0.002]), rtol=1e-3, atol=0)
    x0 = policy.prior.sample(20000, (2,), torch.Generator().manual_seed(0), "cpu")
    assert abs(float(x0.std()) - 80.0) < 1.0  # 20k draws: std error of the std ~ 80 / sqrt(2 * 40000) ~ 0.3


def test_edm_backbone_with_a_tiny_unet_samples():
    unet = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1, "block_out_channels": [8, 16],
            "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4}
    policy = build_edm_backbone((1, 8, 8), unet=unet, num_steps=4, rho=4.0, stochastic_last=True)
    traj = policy.sample(3, torch.Generator().manual_seed(0))
    assert traj.states.shape == (5, 3, 1, 8, 8) and torch.isfinite(traj.states).all()
