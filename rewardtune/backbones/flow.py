"""Backbone `flow`: a flow-matching (rectified-flow) velocity network run as a T-step Gaussian policy.

Convention (SD3 and diffusers' `FlowMatchEulerDiscreteScheduler`): the noisy sample at level s in [0, 1] is

    x_s = (1 - s) x_data + s eps,   eps ~ N(0, I),   s = 1: pure noise,   s = 0: data,

and the network predicts the velocity v_theta(x_s, s, c) ~ dx_s/ds = eps - x_data, seeing the timestep 1000 s. The
sampler runs a T-step grid 1 = s_0 > s_1 > ... > s_T = 0 (`flow_levels`: evenly spaced, then SD3's time shift
s' = shift s / (1 + (shift - 1) s)). The probability-flow ODE step is Euler's, x + v dt with dt = s_{t+1} - s_t < 0.
The policy is the SDE with the same marginals (the Gaussian policy of Flow-GRPO): with eps_hat = x + (1 - s) v the
score is -eps_hat / s, and the reverse-time SDE with diffusion g, dx = [v - g^2/2 score] ds + g dw, discretised by
Euler-Maruyama, is the transition

    x_{t+1} = a_t x_t + b_t v_theta(x_t, s_t, c) + sigma_t z,                                   (`flow_sde_transition`)
    a_t = 1 + g_t^2 dt / (2 s_t),   b_t = (1 + g_t^2 (1 - s_t) / (2 s_t)) dt,   sigma_t = g_t sqrt(-dt),
    g_t = noise_level sqrt(s~ / (1 - s~)),   s~ = s_t, or at s_t = 1 the grid's next level s_{t+1}.

a_t x_t + b_t v_theta is the policy mean of the DxMI paper's Eq. (1). As for the eps-backbones, the mean's
coefficients use the schedule's g_t; the learnable sigma_t (initialised at the schedule's) change only the injected
noise. noise_level = 0 is the ODE sampler with sigma_t at `sigma_floor`. Log-probs are computed in float32 by the
base class whatever the network's precision.

Conditional: v_theta(x, s, c) with the chain's condition; at a CFG scale w != 1 the policy's velocity is the guided
one, v_u + w (v_c - v_u), so the guided mean is the policy mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rewardtune.backbones.base import IMAGE_RANGE, GaussianChainPolicy
from rewardtune.backbones.epsilon import check_cfg_scale
from rewardtune.conditions import Conditions, condition_tensor
from rewardtune.nets.conditioning import Conditioning, guided_call
from rewardtune.nets.mlp import TimeMLP

TIMESTEP_SCALE = 1000.0
"""The network's timestep for level s is TIMESTEP_SCALE * s (SD3's convention)."""


def flow_levels(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The sampler's noise levels s_0 = 1 > ... > s_T = 0: T + 1 evenly spaced levels, time-shifted as SD3's
    scheduler does (s' = shift s / (1 + (shift - 1) s); shift > 1 spends more steps at high noise). float64 [T + 1].

    Raises:
        ValueError: num_steps < 1 or shift <= 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


@dataclass(frozen=True)
class FlowStepCoefficients:
    """Per-step coefficients of x_{t+1} = a x_t + b v(x_t, s_t) + sigma z (float64 tensors [T]) and the levels s_t."""

    a: torch.Tensor
    b: torch.Tensor
    sigma: torch.Tensor
    level: torch.Tensor


def flow_sde_transition(levels: torch.Tensor, noise_level: float = 0.7) -> FlowStepCoefficients:
    """The Euler-Maruyama step of the marginal-preserving flow SDE between consecutive `levels` [T + 1] (decreasing
    from 1 to 0); see the module docstring for the formula. noise_level = 0 gives the ODE (Euler) step.

    Raises:
        ValueError: levels not strictly decreasing within [0, 1], or a negative noise_level.
    """
    s = levels.to(torch.float64)
    if s.dim() != 1 or s.shape[0] < 2 or bool((s[1:] >= s[:-1]).any()) or bool((s < 0).any() | (s > 1).any()):
        raise ValueError("levels must decrease strictly within [0, 1]")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    s_from, dt = s[:-1], s[1:] - s[:-1]
    s_for_g = torch.where(s_from >= 1.0, s[1:], s_from)  # g diverges at s = 1: use the next level there
    g = noise_level * torch.sqrt(s_for_g / (1 - s_for_g))
    a = 1 + g**2 * dt / (2 * s_from)
    b = (1 + g**2 * (1 - s_from) / (2 * s_from)) * dt
    return FlowStepCoefficients(a=a, b=b, sigma=g * torch.sqrt(-dt), level=s_from)


class FlowChainPolicy(GaussianChainPolicy):
    """A T-step policy around a velocity network `velocity_net(x, 1000 s) -> v` (or `(x, 1000 s, c)`).

    Args:
        velocity_net: module mapping (x [B, *shape], timestep [B] float) to a tensor of x's shape (or [B, D]).
        sample_shape: event shape.
        num_steps: T.
        shift: SD3's time shift of the level grid (1: evenly spaced).
        noise_level: the SDE's noise scale (Flow-GRPO's default 0.7; 0: the ODE).
        conditioning: what condition `velocity_net` takes as a third argument (None: unconditional).
        cfg_scale: classifier-free guidance scale w of the policy's velocity (1: the conditional network itself).
        **policy_kwargs: passed to `GaussianChainPolicy` (learn_sigma, fix_last_sigma, sigma_floor, prior,
            output_range).
    """

    network_name = "velocity_net"  # the attribute holding the denoising network (what FSDP shards)

    def __init__(
        self,
        velocity_net: nn.Module,
        sample_shape: tuple[int, ...],
        *,
        num_steps: int,
        shift: float = 1.0,
        noise_level: float = 0.7,
        conditioning: Conditioning | None = None,
        cfg_scale: float = 1.0,
        **policy_kwargs,
    ) -> None:
        coef = flow_sde_transition(flow_levels(num_steps, shift), noise_level)
        super().__init__(sample_shape, coef.sigma, **policy_kwargs)
        self.velocity_net = velocity_net
        self.conditioning = conditioning
        self.cfg_scale = check_cfg_scale(cfg_scale, conditioning)
        self.shift, self.noise_level = float(shift), float(noise_level)
        # derived from (T, shift, noise_level), so not part of checkpoints
        self.register_buffer("levels", coef.level.float(), persistent=False)  # [T], s_t of sampler step t
        self.register_buffer("coef_a", coef.a.float(), persistent=False)  # [T]
        self.register_buffer("coef_b", coef.b.float(), persistent=False)  # [T]

    def predict_velocity(
        self, x: torch.Tensor, s: torch.Tensor, condition: Conditions | None = None, *, cfg_scale: float | None = None
    ) -> torch.Tensor:
        """v_theta(x, s, c) reshaped to x's shape, for levels s [B] in [0, 1], guided at `cfg_scale` (default: the
        policy's)."""
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        return guided_call(self.velocity_net, x, TIMESTEP_SCALE * s, condition_tensor(condition), scale).view_as(x)

    def mean(self, x: torch.Tensor, t: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        view = (-1, *([1] * len(self.sample_shape)))
        v = self.predict_velocity(x, self.levels[t], condition)
        return self.coef_a[t].view(view) * x + self.coef_b[t].view(view) * v

    def network_state(self) -> dict[str, torch.Tensor]:
        """The weights that carry over between samplers of different T (the velocity network only)."""
        return {f"velocity_net.{k}": v for k, v in self.velocity_net.state_dict().items()}


def build_flow_backbone(
    sample_shape: tuple[int, ...],
    conditioning: Conditioning | None = None,
    /,
    *,
    num_steps: int = 5,
    shift: float = 1.0,
    noise_level: float = 0.7,
    hidden: int | None = None,
    depth: int | None = None,
    time_dim: int | None = None,
    unet: dict | None = None,
    learn_sigma: bool = True,
    fix_last_sigma: bool = False,
    sigma_floor: float = 1e-3,
    cfg_scale: float = 1.0,
) -> FlowChainPolicy:
    """A flow-matching velocity network as a T-step policy (pretrain it with algorithm `flow_matching`).

    Vectors: a TimeMLP (`hidden` 128, `depth` 3, `time_dim` 128), the sample being x_T itself. Images: a diffusers
    `UNet2DModel` built from the `unet` config table (its constructor arguments), the sample being x_T clamped to
    [-1, 1]. With `conditioning` (a [conditions] table) the network also takes the condition's embedding, and
    `cfg_scale` is the policy's classifier-free guidance scale.

    Raises:
        ValueError: a `unet` for vector data, MLP options beside a `unet`, or a UNet whose image size is not the data's.
    """
    policy_kwargs = {"learn_sigma": learn_sigma, "fix_last_sigma": fix_last_sigma, "sigma_floor": sigma_floor}
    mlp_options = {"hidden": hidden, "depth": depth, "time_dim": time_dim}
    if unet is None:
        dim = 1
        for size in sample_shape:
            dim *= size
        sizes = {k: v if v is not None else default for (k, v), default in zip(mlp_options.items(), (128, 3, 128))}
        if sizes["time_dim"] < 1:
            raise ValueError("time_dim must be >= 1: a velocity depends on the noise level")
        net: nn.Module = TimeMLP(dim, dim, **sizes, conditioning=conditioning)
    else:
        given = [k for k, v in mlp_options.items() if v is not None]
        if given:
            raise ValueError(f"{given[0]} is an option of the velocity MLP; with a unet table, set the UNet's sizes there")
        from diffusers import UNet2DModel

        from rewardtune.backbones.ddpm import UNetEps, check_image_shape

        if len(sample_shape) != 3:
            raise ValueError(f"a unet needs images (C, H, W), got sample shape {tuple(sample_shape)}")
        model = UNet2DModel(**unet)
        check_image_shape(model, sample_shape)
        net = UNetEps(model, conditioning)  # a UNet mapping (x, timestep, c) to a tensor of x's shape
        policy_kwargs["output_range"] = IMAGE_RANGE
    return FlowChainPolicy(
        net,
        tuple(sample_shape),
        num_steps=num_steps,
        shift=shift,
        noise_level=noise_level,
        conditioning=conditioning,
        cfg_scale=cfg_scale,
        **policy_kwargs,
    )
