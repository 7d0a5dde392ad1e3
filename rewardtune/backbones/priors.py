"""Priors pi(x_0): where a policy's chains start. A recipe's optional [prior] table replaces the backbone's own
(N(0, I); N(0, sigma_max^2 I) for EDM). Prior factories may ask for the data (`data`) and the built reward
(`reward`): the prior is built after both (build.py) and set as `backbone.prior`.

Every prior is an `nn.Module` with `sample(n, shape, generator, device) -> [n, *shape]`; its parameters and buffers
are part of the backbone's checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from rewardtune.backbones.base import StandardNormalPrior
from rewardtune.nets.autoencoder import to_sphere


def build_standard_normal_prior() -> StandardNormalPrior:
    """Prior `standard_normal`: x_0 ~ N(0, I)."""
    return StandardNormalPrior()


class Shared:
    """A reference that `copy.deepcopy` keeps (the EMA copy and KL reference of a backbone share its prior's data)."""

    def __init__(self, obj) -> None:
        self.obj = obj

    def __deepcopy__(self, memo) -> Shared:
        return self


class NoisedDataPrior(nn.Module):
    """pi(x_0): data perturbed in an autoencoder's latent space (DxMI Appendix C.3, after MPDR):

        x ~ data,   z = Enc(x) + s * eps,   eps ~ N(0, I),   x_0 = Dec(z)   (on the sphere for a sphere decoder).

    Args:
        data: the data source (`sample(n, generator, device)`).
        autoencoder: a module with `encode` [B, D] -> [B, L] and `decode` [B, L] -> [B, D]; kept frozen (a copy of
            the pretrained energy: "we fix the autoencoder used for generating the initial samples").
        noise: s, the latent perturbation's standard deviation (absolute).
        sphere: project x_0 onto the unit sphere (a no-op for a sphere decoder, up to rounding).
    """

    def __init__(self, data, autoencoder: nn.Module, noise: float, *, sphere: bool = True) -> None:
        super().__init__()
        self.data_ref = Shared(data)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.register_buffer("noise", torch.tensor(float(noise)))
        self.sphere = sphere

    @torch.no_grad()
    def sample(self, n: int, shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
        x = self.data_ref.obj.sample(n, generator, device).to(device)
        if tuple(x.shape[1:]) != tuple(shape):
            raise ValueError(f"noised_data: the data's shape {tuple(x.shape[1:])} is not the policy's {tuple(shape)}")
        z = self.autoencoder.encode(x)
        z = z + self.noise * torch.randn(z.shape, generator=generator, device=z.device)
        x0 = self.autoencoder.decode(z)
        return to_sphere(x0) if self.sphere else x0

    def train(self, mode: bool = True) -> NoisedDataPrior:  # the frozen autoencoder stays in eval mode
        return super().train(False)


def build_noised_data_prior(
    data, reward, /, *, noise_scale: float = 1.0, reference: int = 4096, sphere: bool = True
) -> NoisedDataPrior:
    """Prior `noised_data`, with a frozen copy of the reward's (pretrained) autoencoder. The latent noise is
    `noise_scale` times the mean per-dimension standard deviation of the latents of `reference` data points (drawn
    with a generator seeded from the run's seed), so the setting does not depend on the latent's scale.

    Raises:
        ValueError: a reward without an autoencoder, a negative noise_scale.
    """
    import copy

    autoencoder = getattr(reward, "autoencoder", None)
    if autoencoder is None:
        raise ValueError("prior noised_data perturbs data through the reward's autoencoder: use [reward] kind = "
                         "\"autoencoder\"")
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    frozen = copy.deepcopy(autoencoder)
    generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
    with torch.no_grad():
        device = next(frozen.parameters()).device
        latents = frozen.encode(data.sample(reference, generator, device).to(device))
    noise = noise_scale * float(latents.std(0).mean())
    return NoisedDataPrior(data, frozen, noise, sphere=sphere)
