"""Algorithm `ddpm`: plain DDPM pretraining of an eps-prediction backbone (Ho et al. 2020, Algorithm 1).

    k ~ U{0..K-1},  eps ~ N(0, I),  x_k = sqrt(ab_k) x_0 + sqrt(1 - ab_k) eps,  L = ||eps - eps_theta(x_k, k)||^2 / D.

Only the eps-network is trained; the policy's sigma_t stay at the schedule's values. It needs no rollout.
"""

from __future__ import annotations

import torch

from rewardtune.backbones.epsilon import EpsilonChainPolicy
from rewardtune.errors import RecipeError
from rewardtune.optim import GradStep
from rewardtune.types import Trajectory


def ddpm_loss(backbone: EpsilonChainPolicy, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The simple DDPM loss (mean over batch and dimensions)."""
    n = x0.shape[0]
    k = torch.randint(0, backbone.num_train_steps, (n,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    ab = backbone.alphas_cumprod[k].view(-1, *([1] * (x0.dim() - 1)))
    x_k = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    return (backbone.predict_eps(x_k, k.float()) - noise).pow(2).mean()


class DDPMPretrain:
    """Trains `backbone.eps_net` with the DDPM loss, in train mode (`backbone_mode`): dropout, where the network has
    it, regularises the denoising loss, as in DDPM pretraining."""

    needs_rollout = False
    backbone_mode = "train"  # the trainer's mode for the backbone during `update`

    def __init__(self, backbone: EpsilonChainPolicy, *, lr: float = 1e-3, grad_clip: float | None = None) -> None:
        if not isinstance(backbone, EpsilonChainPolicy):
            raise TypeError(f"algorithm 'ddpm' needs an eps-prediction backbone, got {type(backbone).__name__}")
        self.backbone = backbone
        self.optimizer = GradStep([(backbone.network_parameters(), lr)], grad_clip=grad_clip)

    def update(self, real: torch.Tensor, trajectory: Trajectory | None, generator) -> dict[str, float]:
        loss = ddpm_loss(self.backbone, real, generator)
        self.optimizer.step(loss)
        return {"ddpm/loss": loss.item()}

    def modules(self) -> dict[str, torch.nn.Module]:
        return {}

    def optimizers(self) -> dict[str, GradStep]:
        return {"sampler": self.optimizer}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def guide(self, scale: float):
        raise RecipeError("value guidance needs an algorithm with a value function (dxdp), not 'ddpm'")


def build_ddpm(backbone: EpsilonChainPolicy, /, *, lr: float = 1e-3, grad_clip: float | None = None) -> DDPMPretrain:
    """Algorithm `ddpm`."""
    return DDPMPretrain(backbone, lr=lr, grad_clip=grad_clip)
