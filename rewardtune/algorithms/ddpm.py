"""Algorithm `ddpm`: plain DDPM pretraining of an eps-prediction backbone (Ho et al. 2020, Algorithm 1).

    k ~ U{0..K-1},  eps ~ N(0, I),  x_k = sqrt(ab_k) x_0 + sqrt(1 - ab_k) eps,  L = ||eps - eps_theta(x_k, k)||^2 / D.

Only the eps-network is trained; the policy's sigma_t stay at the schedule's values. It needs no rollout.

Conditional (a [conditions] table): eps_theta(x_k, k, c) with each data point's own condition c, replaced by "no
condition" with probability `p_uncond` (Ho & Salimans 2022), so that the one network also learns the unconditional
branch classifier-free guidance needs.
"""

from __future__ import annotations

import torch

from rewardtune.backbones.epsilon import EpsilonChainPolicy
from rewardtune.conditions import Conditions
from rewardtune.errors import RecipeError
from rewardtune.optim import GradStep
from rewardtune.types import Trajectory


def ddpm_loss(
    backbone: EpsilonChainPolicy,
    x0: torch.Tensor,
    generator: torch.Generator | None,
    condition: Conditions | None = None,
) -> torch.Tensor:
    """The simple DDPM loss (mean over batch and dimensions) of data x0 [B, ...] with their conditions (B rows, or
    None), on the unguided network (CFG scale 1)."""
    n = x0.shape[0]
    k = torch.randint(0, backbone.num_train_steps, (n,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    ab = backbone.alphas_cumprod[k].view(-1, *([1] * (x0.dim() - 1)))
    x_k = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    return (backbone.predict_eps(x_k, k.float(), condition=condition, cfg_scale=1.0) - noise).pow(2).mean()


class DenoisingPretrain:
    """Pretraining of a backbone's network on data by a regression loss (`loss`, a subclass's), in train mode
    (`backbone_mode`): dropout, where the network has it, regularises the loss, as in DDPM pretraining. The policy's
    sigma_t stay at the schedule's values. Conditional: each data point's own condition, dropped ("no condition")
    with probability `p_uncond` so the network also learns the unconditional branch CFG needs."""

    needs_rollout = False
    backbone_mode = "train"  # the trainer's mode for the backbone during `update`
    conditional = True  # trains conditional backbones on the data's own conditions (`real_condition`)
    name = ""  # the recipe kind, which prefixes the logged loss

    def __init__(self, backbone, *, lr: float = 1e-3, grad_clip: float | None = None, p_uncond: float = 0.0) -> None:
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
        if p_uncond > 0 and backbone.conditioning is None:
            raise ValueError(f"p_uncond = {p_uncond} drops conditions, but the backbone is unconditional (no [conditions])")
        self.backbone = backbone
        self.p_uncond = p_uncond
        self.optimizer = GradStep([(backbone.network_parameters(), lr)], grad_clip=grad_clip)

    def loss(self, x0: torch.Tensor, generator, condition: Conditions | None) -> torch.Tensor:
        """The scalar loss of data x0 [B, ...] under their (possibly dropped) conditions."""
        raise NotImplementedError

    def update(
        self,
        real: torch.Tensor,
        trajectory: Trajectory | None,
        generator,
        real_condition: Conditions | None = None,
    ) -> dict[str, float]:
        condition = real_condition
        if condition is not None and self.p_uncond > 0:
            drop = torch.rand(len(condition), generator=generator, device=real.device) < self.p_uncond
            condition = condition.dropped(drop)
        loss = self.loss(real, generator, condition)
        self.optimizer.step(loss)
        return {f"{self.name}/loss": loss.item()}

    def modules(self) -> dict[str, torch.nn.Module]:
        return {}

    def optimizers(self) -> dict[str, GradStep]:
        return {"sampler": self.optimizer}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def guide(self, scale: float):
        raise RecipeError(f"value guidance needs an algorithm with a value function (dxdp), not {self.name!r}")


class DDPMPretrain(DenoisingPretrain):
    """Trains `backbone.eps_net` with the DDPM loss (`ddpm_loss`)."""

    name = "ddpm"

    def __init__(
        self, backbone: EpsilonChainPolicy, *, lr: float = 1e-3, grad_clip: float | None = None, p_uncond: float = 0.0
    ) -> None:
        if not isinstance(backbone, EpsilonChainPolicy):
            raise TypeError(f"algorithm 'ddpm' needs an eps-prediction backbone, got {type(backbone).__name__}")
        super().__init__(backbone, lr=lr, grad_clip=grad_clip, p_uncond=p_uncond)

    def loss(self, x0: torch.Tensor, generator, condition: Conditions | None) -> torch.Tensor:
        return ddpm_loss(self.backbone, x0, generator, condition)


def build_ddpm(
    backbone: EpsilonChainPolicy, /, *, lr: float = 1e-3, grad_clip: float | None = None, p_uncond: float = 0.0
) -> DDPMPretrain:
    """Algorithm `ddpm` (`p_uncond`: the probability of training a data point without its condition, for CFG)."""
    return DDPMPretrain(backbone, lr=lr, grad_clip=grad_clip, p_uncond=p_uncond)
