"""Backbone `gmm`: the exact noise prediction of a Gaussian mixture, run as a T-step DDPM policy.

A mixture p~ = sum_k w_k N(mu_k, Sigma_k) diffused by the DDPM forward process x_n = sqrt(ab_n) x_0 + sqrt(1 - ab_n) eps
stays a mixture (`score_sde.gmm.DiffusedGMM`), so its optimal epsilon network is known in closed form:

    eps*(x, n) = -sqrt(1 - ab_n) grad_x log p~_n(x)

at every DDPM timestep n (fractional n: `schedules.alpha_bar_at`, the inverse of `schedules.continuous_timestep`,
so FastDPM's fractional timesteps get their own ab exactly). Wrapped in the same
`EpsilonChainPolicy` as `mlp` and `ddpm`, it is a frozen "pretrained model" with no error of its own but the
mixture's: the boosting thesis's toy (../shared/papers/004, Sec. 3.1; `recipes/dg_gmm.toml`), where the model
misses mass on a mode of the data and discriminator guidance must restore it. It has no parameters to train.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from rewardtune.backbones.epsilon import EpsilonChainPolicy
from rewardtune.backbones.schedules import alpha_bar_at, ddpm_alphas_cumprod
from rewardtune.score_sde.gmm import DiffusedGMM


class DDPMLevels:
    """The DDPM forward process indexed by timestep n (float, fractional allowed) in the `SDE` interface that
    `DiffusedGMM` reads: alpha(n) = sqrt(ab_n), sigma(n) = sqrt(1 - ab_n), ab from `schedules.alpha_bar_at`."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)

    def alpha_bar(self, n: torch.Tensor) -> torch.Tensor:
        return alpha_bar_at(n, self.alphas_cumprod)

    def alpha(self, n: torch.Tensor) -> torch.Tensor:
        return self.alpha_bar(n).sqrt()

    def sigma(self, n: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha_bar(n)).sqrt()


class MixtureEpsilon(nn.Module):
    """eps*(x [B, D], n [B]) of a diffused Gaussian mixture (module docstring), in x's dtype and device [B, D];
    computed in float64 on the CPU (a toy of a few components: exactness over speed).

    Args:
        weights: [K] positive (normalised).
        means: [K, D].
        variances: [K] isotropic variances (or [K, D] diagonal, [K, D, D] full), data units squared.
        alphas_cumprod: [N] the DDPM schedule's ab.
    """

    def __init__(self, weights, means, variances, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.mixture = DiffusedGMM(torch.as_tensor(weights), torch.as_tensor(means), torch.as_tensor(variances),
                                   DDPMLevels(alphas_cumprod))

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        n = torch.as_tensor(n, dtype=torch.float64, device="cpu").expand(x.shape[0])
        score = self.mixture.score(x.detach().cpu(), n)  # float64 [B, D]
        eps = -self.mixture.sde.sigma(n)[:, None] * score
        return eps.to(device=x.device, dtype=x.dtype)


def build_gmm_backbone(
    sample_shape: tuple[int, ...],
    conditioning=None,
    /,
    *,
    weights: Sequence[float],
    means: Sequence[Sequence[float]],
    variances: Sequence[float],
    num_steps: int = 20,
    schedule: Literal["strided", "fastdpm"] = "strided",
    num_train_steps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> EpsilonChainPolicy:
    """Backbone `gmm` (module docstring): the exact epsilon of the mixture (weights [K], means [K][D], isotropic
    variances [K]) on a T-step DDPM sub-schedule, sigma_t fixed at the schedule's.

    Raises:
        ValueError: a conditional recipe, a mixture whose dimension is not the data's, mismatched lengths.
    """
    if conditioning is not None:
        raise ValueError("backbone gmm is an unconditional mixture: drop the [conditions] table")
    means_t = torch.as_tensor(means, dtype=torch.float64)
    if means_t.dim() != 2 or (means_t.shape[1],) != tuple(sample_shape):
        raise ValueError(f"means must be [K][D] with D = the data's {tuple(sample_shape)}; got {tuple(means_t.shape)}")
    if len(weights) != means_t.shape[0] or len(variances) != means_t.shape[0]:
        raise ValueError(f"weights, means and variances need one entry per component; got {len(weights)}, "
                         f"{means_t.shape[0]}, {len(variances)}")
    if min(variances) <= 0:
        raise ValueError(f"variances must be positive, got {list(variances)}")
    alphas_cumprod = ddpm_alphas_cumprod(num_train_steps, beta_start, beta_end, "linear")
    net = MixtureEpsilon(weights, means_t, torch.as_tensor(variances, dtype=torch.float64), alphas_cumprod)
    return EpsilonChainPolicy(
        net, sample_shape, num_steps=num_steps, schedule=schedule, num_train_steps=num_train_steps,
        beta_start=beta_start, beta_end=beta_end, learn_sigma=False,
    )
