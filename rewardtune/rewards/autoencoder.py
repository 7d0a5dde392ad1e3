"""Reward `autoencoder`: an energy that is a reconstruction error, E(x) = ||x - Dec(Enc(x))||^2 with the decoder on
the unit sphere (DxMI §5.3 and Appendix C.3, after MPDR). reward = -E; trained by DxMI's EBM update (the
`energy` reward's loss, Algorithm 1 line 4) after a reconstruction pretraining on the data, run when the recipe is
built. The value function stays a separate network: the energy keeps its autoencoder structure.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from rewardtune.nets.autoencoder import SphereAutoencoder, pretrain_autoencoder
from rewardtune.optim import GradStep
from rewardtune.rewards.energy import EnergyReward


class AutoencoderEnergy(EnergyReward):
    """r(x) = -||x - x_hat(x)||^2 for vectors x [B, D]; `autoencoder` is the SphereAutoencoder (the `noised_data`
    prior copies it)."""

    name: ClassVar[str] = "autoencoder"

    @property
    def autoencoder(self) -> SphereAutoencoder:
        return self.energy


def build_autoencoder_reward(
    sample_shape: tuple[int, ...],
    data,
    reporter=None,
    /,
    *,
    latent: int = 128,
    hidden: int = 1024,
    depth: int = 3,
    sphere: bool = True,
    lr: float = 1e-4,
    gamma: float = 1.0,
    grad_clip: float | None = None,
    pretrain_steps: int = 2000,
    pretrain_lr: float = 1e-3,
    pretrain_batch: int = 784,
) -> AutoencoderEnergy:
    """The autoencoder energy on vectors `sample_shape` = (D,), pretrained for `pretrain_steps` Adam steps of the mean
    reconstruction error on data batches of `pretrain_batch` (0: start from random weights). The pretraining draws
    its batches from a generator seeded with the run's seed, so every process builds the same energy. `lr` is the EBM
    update's learning rate (the paper: 1e-4); `gamma` its squared-energy weight. The pretraining's progress goes to
    the run's `reporter` (context).

    Raises:
        ValueError: samples that are not vectors, non-positive sizes.
    """
    if len(sample_shape) != 1:
        raise ValueError(f"the autoencoder energy takes vectors (D,), got sample shape {tuple(sample_shape)}")
    if min(latent, hidden, depth) < 1 or pretrain_steps < 0:
        raise ValueError("latent, hidden and depth must be >= 1 and pretrain_steps >= 0")
    model = SphereAutoencoder(sample_shape[0], latent=latent, hidden=hidden, depth=depth, sphere=sphere)
    if pretrain_steps:
        generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
        pretrain_autoencoder(
            model, data, steps=pretrain_steps, batch_size=pretrain_batch, lr=pretrain_lr, generator=generator,
            reporter=reporter,
        )
    optimizer = GradStep([(model.parameters(), lr)], grad_clip=grad_clip)
    return AutoencoderEnergy(model, optimizer, gamma=gamma)


# A checkpoint holds the energy's weights: resuming, eval and sample skip the pretraining (build.checkpoint_replaced).
build_autoencoder_reward.checkpoint_replaces = {"pretrain_steps": 0}
