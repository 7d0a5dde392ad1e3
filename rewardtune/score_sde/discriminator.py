"""A time-conditioned density-ratio discriminator d_phi(x, t) for discriminator guidance (Kim et al. 2023, "Refining
Generative Process with Discriminator Guidance"; the boosting thesis, ../shared/papers/004, Sec. 3.1).

d_phi is a logit: at the optimum of the cross-entropy, d_phi(x, t) = log p_t(x) / p~_t(x) (p: diffused data, p~: the
frozen model's diffused samples), and guidance adds w grad_x d_phi to the model's score s_theta. Three losses:

- `bce` (Kim+23): J_CE = E_{p_t}[softplus(-d)] + E_{p~_t}[softplus(d)], i.e. -log sigma(d) on real, -log(1 - sigma(d))
  on model samples. It learns the ratio, not its gradient (the thesis's Thms 5-6).
- `dsm_residual` (the thesis's J_MSE, its Eq. 5.26): E_{x_0 ~ p_0, x_t ~ p_t(. | x_0)} lambda(t)
  ||grad log p_t(x_t | x_0) - s_theta(x_t, t) - grad_x d(x_t, t)||^2, with grad log p_t(x_t | x_0) = -(x_t - alpha_t x_0)
  / sigma_t^2: denoising score matching of the residual score, equal to the ideal J_SM = E_{p_t} ||grad log p_t -
  s_theta - grad d||^2 up to a constant (Prop. 1). It needs double back-propagation (the loss differentiates grad_x d).
- `hybrid`: J_MSE + gamma J_CE (the thesis's final loss).

lambda(t) = sigma_t^2 by default (DSM's usual weighting, which keeps every t's term O(1)); `time_sampling.py` has the
likelihood weighting lambda = g(t)^2 and importance-sampled t.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from rewardtune.nets.mlp import SinusoidalTimeEmbedding, TimeMLP
from rewardtune.score_sde.sdes import SDE
from rewardtune.score_sde.time_sampling import TimeSampler

LOSSES = ("bce", "dsm_residual", "hybrid")


class TimeDiscriminator(nn.Module):
    """d_phi(x, t) -> logits [B] for vectors x [B, D] and continuous times t [B] in [0, 1] (a `TimeMLP` with SiLU;
    times scaled by 1000 before the sinusoidal embedding, as a DDPM timestep)."""

    def __init__(self, dim: int, *, hidden: int = 128, depth: int = 3, time_dim: int = 64) -> None:
        super().__init__()
        self.net = TimeMLP(dim, 1, hidden=hidden, depth=depth, time_dim=time_dim, time_scale=1000.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).squeeze(1)

    def input_gradient(self, x: torch.Tensor, t: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        """grad_x d_phi(x, t): [B, D], the guidance correction (`create_graph` for a loss of it)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self(x, t).sum(), x, create_graph=create_graph)
        return grad


def logistic_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of a classifier's logits, real (label 1) against fake (label 0): mean softplus(-l_real) +
    mean softplus(l_fake). At its optimum the logit is log p_real / p_fake."""
    return nn.functional.softplus(-logit_real).mean() + nn.functional.softplus(logit_fake).mean()


def bce_loss(disc: TimeDiscriminator, real_t: torch.Tensor, fake_t: torch.Tensor, t_real: torch.Tensor,
             t_fake: torch.Tensor) -> torch.Tensor:
    """J_CE on diffused data `real_t` and diffused model samples `fake_t` at their times (a scalar, batch means)."""
    return logistic_loss(disc(real_t, t_real), disc(fake_t, t_fake))


def dsm_residual_loss(disc: TimeDiscriminator, model_score: Callable, sde: SDE, x0: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """J_MSE (module docstring) for data x0 [B, D], times t [B] and the noise that diffuses them (x_t = alpha_t x0 +
    sigma_t noise): the batch mean of w sigma_t^2 ||-noise / sigma_t - s_theta(x_t, t) - grad_x d(x_t, t)||^2, with
    per-row weights w [B] (`time_sampling.TimeSampler`: lambda(t) / sigma_t^2, or a constant under importance
    sampling; None: 1, lambda = sigma_t^2)."""
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    x_t = alpha * x0 + sigma * noise
    with torch.no_grad():
        target = -noise / sigma - model_score(x_t, t)
    residual = target - disc.input_gradient(x_t, t, create_graph=True)
    per_row = sigma.squeeze(1) ** 2 * residual.pow(2).sum(1)
    return (per_row if weight is None else weight * per_row).mean()


def discriminator_loss(kind: Literal["bce", "dsm_residual", "hybrid"], disc: TimeDiscriminator, model_score: Callable,
                       sde: SDE, real0: torch.Tensor, fake0: torch.Tensor, generator: torch.Generator | None,
                       *, gamma: float = 1.0, t_min: float = 1e-3,
                       times: TimeSampler | None = None) -> torch.Tensor:
    """The loss `kind` on a batch of data `real0` and model samples `fake0` (both at t = 0, [B, D]), each diffused to
    its own time: uniform in [t_min, 1] (lambda = sigma_t^2), or drawn by `times` with its weights for the
    denoising term (`time_sampling.py`: the likelihood weighting, importance-sampled t). The cross-entropy term is
    trained at the same drawn times, unweighted.

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown discriminator loss {kind!r}: expected one of {', '.join(LOSSES)}")
    n = real0.shape[0]

    def draw(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if times is None:
            t, weight = t_min + (1 - t_min) * torch.rand(n, generator=generator, dtype=x0.dtype), None
        else:
            t, weight = times.sample(n, generator, x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return t, noise, sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * noise, weight

    t_real, noise_real, real_t, weight = draw(real0)
    loss = real0.new_zeros(())
    if kind in ("bce", "hybrid"):
        t_fake, _, fake_t, _ = draw(fake0)
        loss = loss + (gamma if kind == "hybrid" else 1.0) * bce_loss(disc, real_t, fake_t, t_real, t_fake)
    if kind in ("dsm_residual", "hybrid"):
        loss = loss + dsm_residual_loss(disc, model_score, sde, real0, t_real, noise_real, weight)
    return loss


class ConvTimeDiscriminator(nn.Module):
    """d_phi(x, t) -> logits [B] for images x [B, C, H, W] and times t [B] in [0, 1]: three SiLU convolutions (smooth,
    so grad_x d is a useful guidance field), the time's sinusoidal embedding added after the first, spatial mean,
    linear head. Same interface as `TimeDiscriminator`."""

    def __init__(self, channels: int, *, width: int = 32, time_dim: int = 64) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.embed = nn.Sequential(SinusoidalTimeEmbedding(time_dim), nn.Linear(time_dim, width), nn.SiLU())
        self.body = nn.Sequential(
            nn.SiLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
        )
        self.head = nn.Linear(2 * width, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.stem(x) + self.embed(t.float() * 1000.0)[:, :, None, None]
        return self.head(self.body(h).mean(dim=(2, 3))).squeeze(1)

    input_gradient = TimeDiscriminator.input_gradient
