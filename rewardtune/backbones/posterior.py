"""Backbone `posterior_sampling`: DDGAN / DDAEBM's implicit few-step sampler (DDAEBM paper, Eq. (9)).

A generator G_phi(x_k, z, k) predicts the clean sample from the level-k state and a latent z ~ N(0, I_d); the next
state is drawn from the forward process's posterior around that prediction:

    x0_hat = G_phi(x_k, z, k),   x_{k-1} = coef_x0[k] x0_hat + coef_xk[k] x_k + sqrt(var[k]) eps,   eps ~ N(0, I),

with the DDPM posterior q(x_{k-1} | x_k, x_0) of a VP-SDE schedule (`schedules.vp_sde_schedule`, `ddpm_posterior`).
Marginalising z makes p_phi(x_{k-1} | x_k) non-Gaussian (multi-modal where the data are), which a Gaussian step of a
T = 4 chain cannot be.

Index convention: rewardtune's chain time t = 0..T runs from the prior draw to the sample; the paper's level k = T..0
runs the other way, so chain state x_t is level k = T - t and transition t (x_t -> x_{t+1}) goes from level T - t to
T - t - 1. The last transition (level 1 -> 0) has posterior variance 0: x_T = x0_hat exactly (`ddpm_posterior`:
coef_x0[1] = 1, coef_xk[1] = 0), so `sigma()` ends in 0, not in a floor.

It is a `GaussianChainPolicy` given z (each step is Gaussian around a mean that depends on z), but its policy density
p_phi(x_{k-1} | x_k) = E_z[...] has no closed form: `log_prob` and `entropy` raise, trajectories carry no log-probs,
and it is trained by algorithm `ddaebm` (which bounds the entropy through an encoder q_psi(z | x_{k-1}, x_k)).
`latent_dim = 0` is the paper's z = 0 ablation (a deterministic x0_hat, a Gaussian step).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rewardtune.backbones.base import IMAGE_RANGE, GaussianChainPolicy, Guide
from rewardtune.backbones.schedules import (
    VPSchedule,
    ddpm_posterior,
    vp_sde_schedule,
    vp_sde_times,
)
from rewardtune.conditions import Conditions
from rewardtune.nets.mlp import TimeMLP
from rewardtune.precision import at_least_fp32
from rewardtune.types import Trajectory


class GeneratorMLP(nn.Module):
    """G(x_k, z, k) -> x0_hat [B, D] for vectors: a `TimeMLP` on [x_k, z] with a sinusoidal embedding of the level k
    (times `time_scale`, which spreads the few integer levels over the embedding's frequencies)."""

    def __init__(self, dim: int, latent_dim: int, *, hidden: int = 256, depth: int = 3, time_dim: int = 64,
                 time_scale: float = 100.0) -> None:
        super().__init__()
        self.net = TimeMLP(dim + latent_dim, dim, hidden=hidden, depth=depth, time_dim=time_dim, time_scale=time_scale)

    def forward(self, x: torch.Tensor, z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.flatten(1), z], dim=1), levels.float()).view_as(x)


class UNetGenerator(nn.Module):
    """G(x_k, z, k) -> x0_hat for images [B, C, H, W]: a diffusers UNet2DModel with the level k as its timestep and
    z added to its time embedding through a linear map (`class_embed_type = "identity"`), tanh on the output (the
    image DDGAN generator's range, [-1, 1])."""

    def __init__(self, unet: nn.Module, latent_dim: int, level_scale: float = 250.0) -> None:
        super().__init__()
        self.unet = unet
        self.level_scale = level_scale  # the level k as a DDPM-like timestep k * level_scale
        embed_dim = unet.config.block_out_channels[0] * 4
        self.latent = nn.Linear(latent_dim, embed_dim) if latent_dim > 0 else None

    def forward(self, x: torch.Tensor, z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        latent = self.latent(z) if self.latent is not None else None
        return torch.tanh(self.unet(x, levels.float() * self.level_scale, class_labels=latent).sample)


RETIRED_BUFFERS = ("alpha_bars",)  # written by checkpoints before 2026-12-01 (a copy of the schedule's, never read)


def drop_retired_buffers(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: forget buffers this policy no longer has, so older checkpoints still load (any other
    unexpected key is still an error)."""
    for name in RETIRED_BUFFERS:
        state_dict.pop(f"{prefix}{name}", None)


class PosteriorSamplingPolicy(GaussianChainPolicy):
    """The implicit T-step sampler of the module docstring.

    Args:
        generator: G(x_k [B, ...], z [B, d], levels [B] (long, 1..T)) -> x0_hat like x_k.
        sample_shape: shape of one sample.
        schedule: the forward process (its T is the number of steps).
        latent_dim: d, the size of z (0: no latent, the z = 0 ablation).
        output_range: the clamp of `output` (images: (-1, 1)).
        level_times: the VP-SDE times t'_k [T + 1] the schedule was made from (default: uniform spacing's).

    Raises:
        ValueError: latent_dim < 0.
    """

    network_name = "generator"

    def __init__(self, generator: nn.Module, sample_shape: tuple[int, ...], schedule: VPSchedule, *,
                 latent_dim: int, output_range: tuple[float, float] | None = None,
                 level_times: torch.Tensor | None = None) -> None:
        if latent_dim < 0:
            raise ValueError(f"latent_dim must be >= 0, got {latent_dim}")
        posterior = ddpm_posterior(schedule)
        levels = torch.arange(schedule.num_steps, 0, -1)  # the level each chain step starts from: T..1
        std = posterior.variance[levels].sqrt().float()
        super().__init__(sample_shape, std, learn_sigma=False, output_range=output_range)
        self.generator = generator
        self.latent_dim = latent_dim
        self.schedule = schedule
        self.register_buffer("posterior_std", std)  # [T], by chain step; the last is 0
        self.register_buffer("coef_x0", posterior.coef_x0.float())  # [T + 1], by level
        self.register_buffer("coef_xk", posterior.coef_xk.float())
        self.register_buffer("betas", schedule.betas.float())
        times = level_times if level_times is not None else vp_sde_times(schedule.num_steps)
        self.register_buffer("level_times", times.float())  # [T + 1]: the VP-SDE time t'_k of each level
        self.register_load_state_dict_pre_hook(drop_retired_buffers)

    # ---- levels and latents ------------------------------------------------------------------------------------
    def level(self, t: torch.Tensor) -> torch.Tensor:
        """The paper's level k = T - t of chain states x_t (t [B] long)."""
        return self.num_steps - t

    def latent(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """z ~ N(0, I_d): [n, d] (d = 0: an empty [n, 0])."""
        return torch.randn((n, self.latent_dim), generator=generator, device=self.device)

    # ---- the transition ----------------------------------------------------------------------------------------
    def predict_x0(self, x: torch.Tensor, levels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x0_hat = G(x_k, z, k) for states x [B, ...] at levels k [B] (1..T)."""
        return self.generator(x, z, levels)

    def posterior_mean(self, x: torch.Tensor, levels: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The mean of q(x_{k-1} | x_k, x_0): coef_x0[k] x_0 + coef_xk[k] x_k."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        return self.coef_x0[levels].view(shape) * x0 + self.coef_xk[levels].view(shape) * x

    def transition(self, x: torch.Tensor, levels: torch.Tensor, z: torch.Tensor, noise: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised in z and eps: (x_{k-1}, x0_hat) from x_k at levels k [B] (1..T), z [B, d], noise like x."""
        x0 = self.predict_x0(x, levels, z)
        std = self.posterior_std[self.num_steps - levels].view((-1,) + (1,) * (x.dim() - 1))
        return self.posterior_mean(x, levels, at_least_fp32(x0)) + std * noise, x0

    def sigma(self) -> torch.Tensor:
        """The posterior standard deviations by chain step [T] (fixed; the last is 0)."""
        return self.posterior_std

    def mean(self, x: torch.Tensor, t: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        raise NotImplementedError(implicit_message("a mean without its latent z"))

    def log_prob(self, x_next, x, t, condition=None) -> torch.Tensor:
        raise NotImplementedError(implicit_message("log-probabilities"))

    def entropy(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(implicit_message("a closed-form entropy"))

    # ---- sampling ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, guide: Guide | None = None,
               x0: torch.Tensor | None = None, condition: Conditions | None = None) -> Trajectory:
        """n chains from the prior (or from `x0`), a fresh z at every step. Trajectories carry no log-probs (the
        policy density is implicit).

        Raises:
            ValueError: a guide or conditions (this sampler takes neither), x0 of the wrong shape.
        """
        if guide is not None:
            raise ValueError("posterior_sampling has no value to guide by")
        if condition is not None:
            raise ValueError("posterior_sampling is unconditional but was given conditions")
        if x0 is not None and tuple(x0.shape) != (n, *self.sample_shape):
            raise ValueError(f"x0 has shape {tuple(x0.shape)}, expected {(n, *self.sample_shape)}")
        x = self.prior.sample(n, self.sample_shape, generator, self.device) if x0 is None else x0.to(self.device)
        states = [x]
        for t in range(self.num_steps):
            z = self.latent(n, generator)
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x, _ = self.transition(x, self.level(self.times(t, n)), z, noise)
            states.append(x)
        return Trajectory(states=torch.stack(states), sigmas=self.posterior_std.clone())

    @torch.no_grad()
    def mean_path(self, x0: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        """The chain from `x0` with z = 0 and no posterior noise: x_T as a deterministic map of x_0."""
        x = x0.to(self.device)
        n = x.shape[0]
        for t in range(self.num_steps):
            z = torch.zeros((n, self.latent_dim), device=x.device)
            x, _ = self.transition(x, self.level(self.times(t, n)), z, torch.zeros_like(x))
        return x

    def network_state(self) -> dict[str, torch.Tensor]:
        """The generator's weights (what `backbone.init_from` carries over)."""
        return {f"generator.{k}": v for k, v in self.generator.state_dict().items()}


def implicit_message(what: str) -> str:
    return (f"posterior_sampling is an implicit policy (x_{{k-1}} depends on a latent z): it has no {what}; train it "
            "with [algorithm] kind = \"ddaebm\"")


def build_posterior_sampling_backbone(
    sample_shape: tuple[int, ...],
    /,
    *,
    num_steps: int = 4,
    beta_min: float = 0.1,
    beta_max: float = 20.0,
    spacing: Literal["uniform", "lsun"] = "uniform",
    eps_small: float = 1e-3,
    latent_dim: int = 2,
    network: Literal["mlp", "unet"] = "mlp",
    hidden: int = 256,
    depth: int = 3,
    time_dim: int = 64,
    unet: dict | None = None,
) -> PosteriorSamplingPolicy:
    """Backbone `posterior_sampling` (module docstring): T = `num_steps` levels of the VP-SDE schedule (beta_min,
    beta_max; `spacing` "uniform" or DDAEBM's "lsun"), a latent of `latent_dim` (0: the z = 0 ablation).

    `network = "mlp"` (vectors): `GeneratorMLP` (hidden, depth, time_dim). `network = "unet"` (images, [C, H, W]):
    `UNetGenerator` around a diffusers UNet2DModel built from the `unet` table (in/out channels and sample_size
    default to the data's), samples clamped to [-1, 1].

    The default schedule (0.1, 20) noises the data to N(0, I) at level T, where sampling starts. (DDAEBM's toy code
    uses (0.01, 0.1), whose level T keeps 97% of the data's scale although its sampling also starts from N(0, I).)

    Raises:
        ValueError: an unknown network, an mlp for images or a unet for vectors, a bad schedule.
    """
    schedule = vp_sde_schedule(num_steps, beta_min, beta_max, eps_small=eps_small, spacing=spacing,
                               max_beta=0.999 if network == "unet" else None)
    if network == "mlp":
        if unet is not None:
            raise ValueError("unet settings need network = \"unet\"")
        if len(sample_shape) != 1:
            raise ValueError(f"network \"mlp\" is for vectors; the data are {tuple(sample_shape)}: use network = \"unet\"")
        generator: nn.Module = GeneratorMLP(sample_shape[0], latent_dim, hidden=hidden, depth=depth, time_dim=time_dim)
        output_range = None
    elif network == "unet":
        if len(sample_shape) != 3:
            raise ValueError(f"network \"unet\" is for images [C, H, W]; the data are {tuple(sample_shape)}")
        from diffusers import UNet2DModel

        channels = sample_shape[0]
        config = {"sample_size": sample_shape[-1], "in_channels": channels, "out_channels": channels, **(unet or {})}
        if latent_dim > 0:
            config["class_embed_type"] = "identity"
        generator = UNetGenerator(UNet2DModel(**config), latent_dim)
        output_range = IMAGE_RANGE
    else:
        raise ValueError(f"unknown posterior_sampling network {network!r}: expected \"mlp\" or \"unet\"")
    times = vp_sde_times(num_steps, eps_small=eps_small, spacing=spacing)
    return PosteriorSamplingPolicy(generator, tuple(sample_shape), schedule, latent_dim=latent_dim,
                                   output_range=output_range, level_times=times)
