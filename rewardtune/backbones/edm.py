"""Backbone `edm`: an EDM-preconditioned denoiser on a Karras sigma grid, run as a T-step ancestral policy.

Preconditioning (Karras et al. 2022, Table 1) with sigma_data = 0.5:

    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise),  c_skip = sd^2 / (sigma^2 + sd^2),
    c_out = sigma sd / sqrt(sigma^2 + sd^2),  c_in = 1 / sqrt(sigma^2 + sd^2),  c_noise = noise_scale * ln(sigma).

Ancestral step sigma_t -> sigma_{t+1} (split into sigma_up, sigma_down; see `schedules.ancestral_split`):

    d = (x - D(x; sigma_t)) / sigma_t,  mean = x + d (sigma_down - sigma_t),  x_{t+1} = mean + s_t z,

with learnable noise s_t initialised to max(sigma_up, 1e-3). The prior is N(0, sigma_max^2 I). F is a diffusers
UNet2DModel (from_pretrained or a random config) or any module `F(x, c_noise)` named by "package.module:factory".

Conditional (a [conditions] table, e.g. ImageNet 64's class labels, as the DxMI paper's Table 3 runs): F(x, c_noise, c)
with the chain's condition, a UNet2DModel through its class-embedding slot (`ddpm.UNetEps`); a network named by
`network` must take the condition tensor as a third argument. With a CFG scale w != 1 the denoiser is the guided
D_u + w (D_c - D_u).
"""

from __future__ import annotations

import torch
from torch import nn

from rewardtune.backbones.base import IMAGE_RANGE, GaussianChainPolicy
from rewardtune.backbones.ddpm import UNetEps, load_unet
from rewardtune.backbones.epsilon import check_cfg_scale
from rewardtune.backbones.schedules import ancestral_split, karras_sigmas
from rewardtune.conditions import Conditions, condition_tensor
from rewardtune.nets.conditioning import Conditioning, guided_call

SIGMA_DATA = 0.5


class ScaledNormalPrior(nn.Module):
    """pi(x_0) = N(0, scale^2 I)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def sample(self, n: int, shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
        return self.scale * torch.randn((n, *shape), generator=generator, device=device)


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in) of EDM's Table 1 for noise levels sigma."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt()


class EDMChainPolicy(GaussianChainPolicy):
    """A T-step ancestral sampler around an EDM denoiser; see the module docstring."""

    network_name = "network"  # the attribute holding the denoising network (what FSDP shards)

    def __init__(
        self,
        network: nn.Module,
        sample_shape: tuple[int, ...],
        *,
        num_steps: int,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        stochastic_last: bool = False,
        noise_scale: float = 0.25,
        conditioning: Conditioning | None = None,
        cfg_scale: float = 1.0,
        **policy_kwargs,
    ) -> None:
        sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho, stochastic_last)
        sigma_up, sigma_down = ancestral_split(sigmas)
        super().__init__(sample_shape, sigma_up, prior=ScaledNormalPrior(sigma_max), **policy_kwargs)
        self.network = network
        self.noise_scale = noise_scale
        self.conditioning = conditioning
        self.cfg_scale = check_cfg_scale(cfg_scale, conditioning)
        self.register_buffer("sigmas", sigmas[:-1].float())  # [T], the level each step starts from
        self.register_buffer("sigma_down", sigma_down.float())  # [T]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        """D(x; sigma, c) for per-sample sigma [B], guided at the policy's CFG scale."""
        view = (-1, *([1] * len(self.sample_shape)))
        c_skip, c_out, c_in = (c.view(view) for c in edm_preconditioning(sigma))
        f = guided_call(self.network, c_in * x, self.noise_scale * sigma.log(), condition_tensor(condition), self.cfg_scale)
        return c_skip * x + c_out * f

    def mean(self, x: torch.Tensor, t: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        view = (-1, *([1] * len(self.sample_shape)))
        sigma = self.sigmas[t]
        d = (x - self.denoise(x, sigma, condition)) / sigma.view(view)
        return x + d * (self.sigma_down[t] - sigma).view(view)

    def state_noise(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) = (1, sigma_t) [N]: chain states at times t < T are x_0 + sigma_t eps."""
        sigma = self.sigmas[t]
        return torch.ones_like(sigma), sigma

    def state_eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's noise estimate (x - D(x; sigma_t)) / sigma_t at chain states x_t (t < T)."""
        sigma = self.sigmas[t]
        return (x - self.denoise(x, sigma)) / sigma.view(-1, *([1] * len(self.sample_shape)))

    def network_state(self) -> dict[str, torch.Tensor]:
        return {f"network.{k}": v for k, v in self.network.state_dict().items()}


def build_edm_backbone(
    sample_shape: tuple[int, ...],
    conditioning: Conditioning | None = None,
    /,
    *,
    pretrained: str = "",
    subfolder: str = "",
    unet: dict | None = None,
    network: str = "",
    num_steps: int = 10,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    stochastic_last: bool = False,
    noise_scale: float = 0.25,
    learn_sigma: bool = True,
    fix_last_sigma: bool = True,
    sigma_floor: float = 1e-3,
    cfg_scale: float = 1.0,
) -> EDMChainPolicy:
    """Backbone `edm`. Exactly one of: `pretrained` (UNet2DModel.from_pretrained id or folder), `unet` (a random
    UNet2DModel config) or `network` ("package.module:factory" returning F(x, c_noise)). `noise_scale` is 0.25 for
    EDM's own networks and 250 for the consistency-models ImageNet-64 UNet DxMI used. The sample (`output`) is x_T
    clamped to the data's pixel range [-1, 1]."""
    chosen = [name for name, v in (("pretrained", pretrained), ("unet", unet), ("network", network)) if v]
    if len(chosen) != 1:
        raise ValueError(f"set exactly one of pretrained, unet, network (got {', '.join(chosen) or 'none'})")
    if network:
        from rewardtune.imports import call_factory_path

        net = call_factory_path(network, f"edm network {network!r}")
    else:
        if unet is not None:
            from diffusers import UNet2DModel

            model = UNet2DModel(**unet)
        else:
            model = load_unet(pretrained, subfolder or None)
        net = UNetEps(model, conditioning)
    return EDMChainPolicy(
        net, tuple(sample_shape), num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
        stochastic_last=stochastic_last, noise_scale=noise_scale, learn_sigma=learn_sigma,
        fix_last_sigma=fix_last_sigma, sigma_floor=sigma_floor, output_range=IMAGE_RANGE,
        conditioning=conditioning, cfg_scale=cfg_scale,
    )
