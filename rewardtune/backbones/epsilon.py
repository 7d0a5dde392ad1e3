"""`EpsilonChainPolicy`: a DDPM epsilon-prediction network run as a T-step Gaussian policy.

The network eps_theta(x, k) is trained (or pretrained) with the standard DDPM loss on K = 1000 steps; the policy
runs it on a T-step sub-schedule with DDIM(eta = 1) transitions (see `schedules.ddim_transition`):

    x_{t+1} = a_t x_t + c_t eps_theta(x_t, k_t) + sigma_t z,

so a_t x_t + c_t eps_theta is the policy mean of the DxMI paper's Eq. (1) with mu_phi = c_t eps_theta. The mean
coefficient c_t always uses the schedule's sigma, not the learned one (as the official DxMI code does), so
learning sigma_t changes only the injected noise.

Conditional: eps_theta(x, k, c) with the chain's condition c; with a CFG scale w != 1 the policy's eps is the
classifier-free guided one, eps_u + w (eps_c - eps_u) (`nets.conditioning.guided_call`), so the guided mean is the
policy mean whose log-probs, values and improvements DxDP and PPO use.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rewardtune.backbones.base import GaussianChainPolicy
from rewardtune.backbones.schedules import (
    ddpm_alphas_cumprod,
    fastdpm_ddpm_schedule,
    strided_ddpm_schedule,
)
from rewardtune.conditions import Conditions, condition_tensor
from rewardtune.nets.conditioning import Conditioning, guided_call

SCHEDULES = {"strided": strided_ddpm_schedule, "fastdpm": fastdpm_ddpm_schedule}
PREDICTIONS = ("epsilon", "sample", "v_prediction")


class EpsilonChainPolicy(GaussianChainPolicy):
    """A T-step policy around an eps-prediction network `eps_net(x, k) -> eps` with DDPM timesteps k in [0, K).

    Args:
        eps_net: module mapping (x [B, *shape], k [B] float) to a tensor of x's shape (or [B, D]).
        sample_shape: event shape.
        num_steps: T, the number of sampler steps.
        schedule: "strided" (T evenly spaced DDPM steps from pure noise) or "fastdpm" (FastDPM's quadratic VAR
            schedule with fractional timesteps, as in DxMI's CIFAR-10 runs; starts below pure noise for small T).
        num_train_steps: K, the DDPM training horizon.
        beta_start, beta_end: the DDPM betas' range.
        beta_schedule: "linear" (DDPM) or "scaled_linear" (Stable Diffusion), see `ddpm_alphas_cumprod`.
        prediction: what the network outputs: "epsilon" (the noise, as DDPM pretraining trains it), "sample" (x_0
            directly; eps = (x - sqrt(ab) x0) / sqrt(1 - ab)) or "v_prediction" (v = sqrt(ab) eps - sqrt(1 - ab) x0,
            as SD 2.x's 768 models; eps = sqrt(ab) v + sqrt(1 - ab) x). A one-step student needs "sample": from pure
            noise (ab = 4e-5) the mean x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) amplifies any eps error 157 times.
        conditioning: what condition `eps_net` takes as a third argument (None: unconditional).
        cfg_scale: classifier-free guidance scale w of the policy's eps (1: the conditional network itself).
        **policy_kwargs: passed to `GaussianChainPolicy` (learn_sigma, fix_last_sigma, sigma_floor, prior).
    """

    network_name = "eps_net"  # the attribute holding the denoising network (what FSDP shards)

    def __init__(
        self,
        eps_net: nn.Module,
        sample_shape: tuple[int, ...],
        *,
        num_steps: int,
        schedule: Literal["strided", "fastdpm"] = "strided",
        num_train_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear"] = "linear",
        prediction: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        conditioning: Conditioning | None = None,
        cfg_scale: float = 1.0,
        **policy_kwargs,
    ) -> None:
        alphas_cumprod = ddpm_alphas_cumprod(num_train_steps, beta_start, beta_end, beta_schedule)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}: expected one of {sorted(SCHEDULES)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: expected one of {', '.join(map(repr, PREDICTIONS))}")
        timesteps, coef = SCHEDULES[schedule](num_steps, alphas_cumprod)
        self.prediction = prediction
        # what rebuilds this schedule (`export.py` writes it next to an exported network)
        self.schedule_settings = {"num_steps": num_steps, "schedule": schedule, "num_train_steps": num_train_steps,
                                  "beta_start": beta_start, "beta_end": beta_end, "beta_schedule": beta_schedule,
                                  "prediction": prediction}
        super().__init__(sample_shape, coef.sigma, **policy_kwargs)
        self.eps_net = eps_net
        self.conditioning = conditioning
        self.cfg_scale = check_cfg_scale(cfg_scale, conditioning)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())  # [K], for DDPM training
        self.register_buffer("timesteps", timesteps.float())  # [T], DDPM step k_t of sampler step t
        self.register_buffer("coef_a", coef.a.float())  # [T]
        self.register_buffer("coef_c", coef.c.float())  # [T]
        # alpha_bar of x_t at sampler step t [T]; derived from the schedule, so not part of checkpoints
        self.register_buffer("step_alphas_cumprod", coef.alpha_bar_from.float(), persistent=False)

    @property
    def num_train_steps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def predict_eps(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        alpha_bar: torch.Tensor | None = None,
        condition: Conditions | None = None,
        *,
        cfg_scale: float | None = None,
    ) -> torch.Tensor:
        """eps_theta(x, k, c) reshaped to x's shape, for DDPM timesteps k [B] (alpha_bar [B] of k: "sample" networks),
        guided at `cfg_scale` (default: the policy's)."""
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        return self.eps_from_output(self.network_output(x, k, condition, scale), x, k, alpha_bar)

    def network_output(self, x: torch.Tensor, k: torch.Tensor, condition: Conditions | None, scale: float) -> torch.Tensor:
        """The network's (guided) prediction at DDPM timesteps k [B], of x's shape."""
        return guided_call(self.eps_net, x, k, condition_tensor(condition), scale).view_as(x)

    def eps_from_output(
        self, out: torch.Tensor, x: torch.Tensor, k: torch.Tensor, alpha_bar: torch.Tensor | None
    ) -> torch.Tensor:
        """eps from the network's output under `prediction` (alpha_bar [B] of k; looked up when None)."""
        if self.prediction == "epsilon":
            return out
        if alpha_bar is None:
            alpha_bar = self.alphas_cumprod[k.long()]
        ab = alpha_bar.view(-1, *([1] * len(self.sample_shape)))
        if self.prediction == "v_prediction":
            return ab.sqrt() * out + (1 - ab).sqrt() * x
        return (x - ab.sqrt() * out) / (1 - ab).sqrt()

    def mean(self, x: torch.Tensor, t: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        view = (-1, *([1] * len(self.sample_shape)))
        eps = self.predict_eps(x, self.timesteps[t], self.step_alphas_cumprod[t], condition)
        return self.coef_a[t].view(view) * x + self.coef_c[t].view(view) * eps

    def state_noise(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) [N] with x_t ~ a_t x_0 + s_t eps the forward marginal of chain states at times t < T (what
        discriminator guidance diffuses data to): sqrt(ab_t), sqrt(1 - ab_t)."""
        ab = self.step_alphas_cumprod[t]
        return ab.sqrt(), (1 - ab).sqrt()

    def state_eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's noise estimate at chain states x_t (t < T), unguided (the model score is -eps / s_t)."""
        return self.predict_eps(x, self.timesteps[t], self.step_alphas_cumprod[t], cfg_scale=1.0)

    def network_state(self) -> dict[str, torch.Tensor]:
        """The weights that carry over between samplers of different T (the eps-network only)."""
        return {f"eps_net.{k}": v for k, v in self.eps_net.state_dict().items()}


def check_cfg_scale(scale: float, conditioning: Conditioning | None) -> float:
    """The CFG scale, checked: finite, and 1 unless the network is conditional (an unconditional one has no
    conditional branch to guide with)."""
    scale = float(scale)
    if not torch.isfinite(torch.tensor(scale)):
        raise ValueError(f"cfg_scale must be finite, got {scale}")
    if scale != 1.0 and conditioning is None:
        raise ValueError(f"cfg_scale = {scale} needs a conditional backbone (a [conditions] table)")
    return scale
