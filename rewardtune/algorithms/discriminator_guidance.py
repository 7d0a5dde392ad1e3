"""Algorithm `discriminator_guidance`: refine a frozen sampler with a time-conditioned density-ratio discriminator
(Kim et al. 2023; the boosting thesis's improved loss, ../shared/papers/004, Sec. 3.1), without training the sampler.

Each iteration rolls the frozen backbone out (`needs_rollout`) and trains d_phi(x, t) at one chain time t per chain:
the chain's state x_t (the model's marginal p~_t) against data diffused to the same noise level, x_t = sqrt(ab_t) x_0
+ sqrt(1 - ab_t) eps (p_t), with ab_t the level of chain time t (`step_alphas_cumprod`; the sample x_T is clean,
ab = 1). Losses (`score_sde/discriminator.py` has their continuous-time forms):

- `bce`: softplus(-d(real_t, t)) + softplus(d(fake_t, t)), so d -> log p_t / p~_t;
- `dsm_residual`: ||(eps_theta(x_t) - eps) - sqrt(1 - ab_t) grad_x d(x_t, t)||^2 on the diffused data (J_MSE with
  lambda = 1 - ab_t: the residual of the model's score s_theta = -eps_theta / sqrt(1 - ab) against the denoising
  target; not defined at the clean level, whose rows it skips);
- `hybrid`: dsm_residual + gamma bce (the thesis's loss).

Sampling with guidance scale w (`eval.guidance_scale`, `rewardtune sample --guidance w`) adds the score correction
after each step, scaled by the step's variance as classifier guidance scales a gradient of a log-density:
x_{t+1} <- x_{t+1} + w sigma_t^2 grad_x d(x_{t+1}, t+1) (value guidance's mechanism, `Guide`).
Discriminator times are chain times divided by T (in [0, 1]).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rewardtune.backbones.epsilon import EpsilonChainPolicy
from rewardtune.errors import RecipeError
from rewardtune.optim import GradStep
from rewardtune.score_sde.discriminator import (
    LOSSES,
    ConvTimeDiscriminator,
    TimeDiscriminator,
)
from rewardtune.types import Trajectory


class DiscriminatorGuidance:
    """The algorithm of the module docstring.

    Args:
        backbone: a frozen eps-prediction policy (`mlp`, `ddpm`).
        discriminator: d(x [B, ...], t [B] in [0, 1]) -> [B] with `input_gradient(x, t, create_graph)`.
        loss: "bce", "dsm_residual" or "hybrid".
        gamma: the hybrid loss's BCE weight.
        lr, grad_clip: the discriminator's Adam.
    """

    needs_rollout = True  # the frozen sampler's chains are the discriminator's model samples
    backbone_mode = "eval"

    def __init__(self, backbone: EpsilonChainPolicy, discriminator: nn.Module, *, loss: str = "hybrid",
                 gamma: float = 1.0, lr: float = 1e-3, grad_clip: float | None = None) -> None:
        self.backbone, self.discriminator = backbone, discriminator
        self.loss, self.gamma = loss, gamma
        self.optimizer = GradStep([(discriminator.parameters(), lr)], grad_clip=grad_clip)

    def chain_alpha_bars(self) -> torch.Tensor:
        """ab of each chain state x_0..x_T: [T + 1] (the last, the sample, is clean: 1)."""
        ab = self.backbone.step_alphas_cumprod
        return torch.cat([ab, torch.ones(1, device=ab.device, dtype=ab.dtype)])

    def times(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.backbone.num_steps

    def update(self, real: torch.Tensor, trajectory: Trajectory | None, generator) -> dict[str, float]:
        """One discriminator step on the data batch `real` [B, ...] against the frozen sampler's `trajectory`."""
        n, steps = real.shape[0], self.backbone.num_steps
        t = torch.randint(0, steps + 1, (n,), generator=generator, device=real.device)
        fake_t = trajectory.states[t, torch.arange(n, device=real.device)]
        ab = self.chain_alpha_bars()[t].view(-1, *([1] * (real.dim() - 1)))
        noise = torch.randn(real.shape, generator=generator, device=real.device)
        real_t = ab.sqrt() * real + (1 - ab).sqrt() * noise
        metrics: dict[str, float] = {}
        loss = real.new_zeros(())
        if self.loss in ("bce", "hybrid"):
            d_real, d_fake = self.discriminator(real_t, self.times(t)), self.discriminator(fake_t, self.times(t))
            bce = nn.functional.softplus(-d_real).mean() + nn.functional.softplus(d_fake).mean()
            loss = loss + (self.gamma if self.loss == "hybrid" else 1.0) * bce
            metrics.update({"discriminator/bce": bce.item(), "discriminator/real": d_real.mean().item(),
                            "discriminator/fake": d_fake.mean().item()})
        if self.loss in ("dsm_residual", "hybrid"):
            dsm = self.dsm_residual(real_t[t < steps], noise[t < steps], t[t < steps])
            loss = loss + dsm
            metrics["discriminator/dsm_residual"] = dsm.item()
        self.optimizer.step(loss)
        return metrics

    def dsm_residual(self, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean ||(eps_theta(x_t) - eps) - sqrt(1 - ab_t) grad_x d(x_t, t)||^2 over diffused data rows at chain times
        t < T (0 for none)."""
        if len(t) == 0:
            return x_t.new_zeros(())
        ab = self.backbone.step_alphas_cumprod[t]
        with torch.no_grad():
            eps_model = self.backbone.predict_eps(x_t, self.backbone.timesteps[t], ab)
        gradient = self.discriminator.input_gradient(x_t, self.times(t), create_graph=True)
        sigma = (1 - ab).sqrt().view(-1, *([1] * (x_t.dim() - 1)))
        return ((eps_model - noise) - sigma * gradient).flatten(1).pow(2).sum(1).mean()

    def guide(self, scale: float):
        """Discriminator guidance: x_{t+1} <- x_{t+1} + scale * sigma_t^2 * grad_x d(x_{t+1}, t+1)."""

        def apply(x: torch.Tensor, t_next: int, sigma: torch.Tensor, condition=None) -> torch.Tensor:
            times = torch.full((x.shape[0],), t_next / self.backbone.num_steps, device=x.device)
            return (x + scale * sigma**2 * self.discriminator.input_gradient(x, times)).detach()

        return apply

    def modules(self) -> dict[str, nn.Module]:
        return {"discriminator": self.discriminator}

    def optimizers(self) -> dict[str, GradStep]:
        return {"discriminator": self.optimizer}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_discriminator_guidance(
    backbone,
    /,
    *,
    loss: Literal["bce", "dsm_residual", "hybrid"] = "hybrid",
    gamma: float = 1.0,
    lr: float = 1e-3,
    grad_clip: float | None = None,
    hidden: int = 128,
    depth: int = 3,
    width: int = 32,
) -> DiscriminatorGuidance:
    """Algorithm `discriminator_guidance` (module docstring). The discriminator is a `TimeDiscriminator` MLP (hidden,
    depth) for vectors, a `ConvTimeDiscriminator` (width) for images. The backbone is frozen: its parameters are not
    trained (set no sampler learning rate).

    Raises:
        RecipeError: a backbone without an eps-network, an unknown loss, gamma < 0.
    """
    if not isinstance(backbone, EpsilonChainPolicy):
        raise RecipeError(f"algorithm 'discriminator_guidance' needs an eps-prediction backbone (mlp, ddpm), got "
                          f"{type(backbone).__name__}")
    if loss not in LOSSES:
        raise RecipeError(f"algorithm.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if gamma < 0:
        raise RecipeError(f"algorithm.gamma must be >= 0, got {gamma}")
    shape = backbone.sample_shape
    disc = TimeDiscriminator(shape[0], hidden=hidden, depth=depth) if len(shape) == 1 else ConvTimeDiscriminator(shape[0], width=width)
    backbone.requires_grad_(False)
    return DiscriminatorGuidance(backbone, disc, loss=loss, gamma=gamma, lr=lr, grad_clip=grad_clip)
