"""Algorithm `discriminator_guidance`: refine a frozen sampler with a time-conditioned density-ratio discriminator
(Kim et al. 2023; the boosting thesis's improved loss, ../shared/papers/004, Sec. 3.1), without training the sampler.

Each iteration rolls the frozen backbone out (`needs_rollout`) and trains d_phi(x, t) at one chain time t per chain:
the chain's state x_t (the model's marginal p~_t) against data diffused to the same noise level, x_t = a_t x_0 + s_t eps
(p_t), with (a_t, s_t) the backbone's `state_noise(t)` (eps backbones: sqrt(ab_t), sqrt(1 - ab_t); EDM: 1, sigma_t;
the sample x_T is clean: a = 1, s = 0). Losses (`score_sde/discriminator.py` has their continuous-time forms):

- `bce`: softplus(-d(real_t, t)) + softplus(d(fake_t, t)), so d -> log p_t / p~_t;
- `dsm_residual`: ||(eps_theta(x_t) - eps) - s_t grad_x d(x_t, t)||^2 on the diffused data (J_MSE with lambda = s_t^2:
  the residual of the model's score s_theta = -eps_theta / s_t, the backbone's `state_eps`, against the denoising
  target; not defined at the clean level, whose rows it skips);
- `hybrid`: dsm_residual + gamma bce (the thesis's loss).

Sampling with guidance scale w (`eval.guidance_scale`, `rewardtune sample --guidance w`) adds the score correction
after each step, scaled by the step's variance as classifier guidance scales a gradient of a log-density:
x_{t+1} <- x_{t+1} + w sigma_t^2 grad_x d(x_{t+1}, t+1) (value guidance's mechanism, `Guide`). The discriminator at
the clean level, `log_ratio(x)`, also post-processes samples by rejection (`rewardtune sample --rejection drs|budgeted`,
rejection.py). Discriminator times are chain times divided by T (in [0, 1]).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rewardtune.errors import RecipeError
from rewardtune.optim import GradStep
from rewardtune.score_sde.discriminator import (
    LOSSES,
    ConvTimeDiscriminator,
    TimeDiscriminator,
    logistic_loss,
)
from rewardtune.types import Trajectory


class DiscriminatorGuidance:
    """The algorithm of the module docstring.

    Args:
        backbone: a frozen policy that declares its chain states' noise (`state_noise`, `state_eps`: `mlp`, `ddpm`,
            `edm`).
        discriminator: d(x [B, ...], t [B] in [0, 1]) -> [B] with `input_gradient(x, t, create_graph)`.
        loss: "bce", "dsm_residual" or "hybrid".
        gamma: the hybrid loss's BCE weight.
        lr, grad_clip: the discriminator's Adam.
    """

    needs_rollout = True  # the frozen sampler's chains are the discriminator's model samples
    backbone_mode = "eval"

    def __init__(self, backbone, discriminator: nn.Module, *, loss: str = "hybrid",
                 gamma: float = 1.0, lr: float = 1e-3, grad_clip: float | None = None) -> None:
        self.backbone, self.discriminator = backbone, discriminator
        self.loss, self.gamma = loss, gamma
        self.optimizer = GradStep([(discriminator.parameters(), lr)], grad_clip=grad_clip)

    def chain_noise(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) [N] of chain states at times t in 0..T (the sample, t = T, is clean: 1, 0)."""
        clean = t == self.backbone.num_steps
        a, s = self.backbone.state_noise(t.clamp(max=self.backbone.num_steps - 1))
        return torch.where(clean, torch.ones_like(a), a), torch.where(clean, torch.zeros_like(s), s)

    def times(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.backbone.num_steps

    def update(self, real: torch.Tensor, trajectory: Trajectory | None, generator) -> dict[str, float]:
        """One discriminator step on the data batch `real` [B, ...] against the frozen sampler's `trajectory`."""
        n, steps = real.shape[0], self.backbone.num_steps
        t = torch.randint(0, steps + 1, (n,), generator=generator, device=real.device)
        fake_t = trajectory.states[t, torch.arange(n, device=real.device)]
        view = (-1, *([1] * (real.dim() - 1)))
        a, s = self.chain_noise(t)
        noise = torch.randn(real.shape, generator=generator, device=real.device)
        real_t = a.view(view) * real + s.view(view) * noise
        metrics: dict[str, float] = {}
        loss = real.new_zeros(())
        if self.loss in ("bce", "hybrid"):
            d_real, d_fake = self.discriminator(real_t, self.times(t)), self.discriminator(fake_t, self.times(t))
            bce = logistic_loss(d_real, d_fake)
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
        """Mean ||(eps_theta(x_t) - eps) - s_t grad_x d(x_t, t)||^2 over diffused data rows at chain times t < T (0 for
        none)."""
        if len(t) == 0:
            return x_t.new_zeros(())
        with torch.no_grad():
            eps_model = self.backbone.state_eps(x_t, t)
        gradient = self.discriminator.input_gradient(x_t, self.times(t), create_graph=True)
        sigma = self.backbone.state_noise(t)[1].view(-1, *([1] * (x_t.dim() - 1)))
        return ((eps_model - noise) - sigma * gradient).flatten(1).pow(2).sum(1).mean()

    def guide(self, scale: float):
        """Discriminator guidance: x_{t+1} <- x_{t+1} + scale * sigma_t^2 * grad_x d(x_{t+1}, t+1)."""

        def apply(x: torch.Tensor, t_next: int, sigma: torch.Tensor, condition=None) -> torch.Tensor:
            times = torch.full((x.shape[0],), t_next / self.backbone.num_steps, device=x.device)
            return (x + scale * sigma**2 * self.discriminator.input_gradient(x, times)).detach()

        return apply

    @torch.no_grad()
    def log_ratio(self, x: torch.Tensor) -> torch.Tensor:
        """d(x, 1): the discriminator at the clean level, an estimate of log p(x) / p~(x) up to a constant (exact for
        `bce` at its optimum; `dsm_residual` fixes only its gradient), for samples x [N, ...]: [N]. What rejection
        sampling (`rejection.py`, `rewardtune sample --rejection`) keeps samples by; both of its rules ignore the
        constant."""
        return self.discriminator(x, torch.ones(x.shape[0], device=x.device)).float().view(-1)

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
    depth) for vectors, a `ConvTimeDiscriminator` (width) for images. The backbone is frozen.

    Raises:
        RecipeError: a backbone without `state_noise` / `state_eps`, an unknown loss, gamma < 0.
    """
    if not all(callable(getattr(backbone, name, None)) for name in ("state_noise", "state_eps")):
        raise RecipeError(f"algorithm 'discriminator_guidance' needs a backbone that declares its states' noise "
                          f"(state_noise, state_eps: mlp, ddpm, edm), not {type(backbone).__name__}")
    if loss not in LOSSES:
        raise RecipeError(f"algorithm.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if gamma < 0:
        raise RecipeError(f"algorithm.gamma must be >= 0, got {gamma}")
    shape = backbone.sample_shape
    disc = TimeDiscriminator(shape[0], hidden=hidden, depth=depth) if len(shape) == 1 else ConvTimeDiscriminator(shape[0], width=width)
    backbone.requires_grad_(False)
    return DiscriminatorGuidance(backbone, disc, loss=loss, gamma=gamma, lr=lr, grad_clip=grad_clip)
