"""Mode coverage of samples from a Gaussian mixture (the 8- and 25-Gaussians toys)."""

from __future__ import annotations

import torch


def mode_coverage(samples: torch.Tensor, centers: torch.Tensor, mode_std: float, *, radius_in_std: float = 2.0,
                  min_fraction: float = 0.01) -> float:
    """The fraction of modes that hold at least `min_fraction` of the samples within `radius_in_std` standard
    deviations of their centre (the usual mode-collapse measure of the 2D GAN/EBM literature: 2 sigma and 1%).

    Args:
        samples: [N, D].
        centers: the modes' centres [K, D].
        mode_std: each mode's standard deviation (isotropic).

    Returns:
        a number in [0, 1]; 1 when every mode is covered.

    Raises:
        ValueError: no samples.
    """
    if samples.shape[0] == 0:
        raise ValueError("mode_coverage needs at least one sample")
    distances = torch.cdist(samples.double().cpu(), centers.double().cpu())  # [N, K]
    near = (distances <= radius_in_std * mode_std).double().mean(0)  # [K]: the fraction of samples near each mode
    return float((near >= min_fraction).double().mean())


def min_mode_mass(samples: torch.Tensor, centers: torch.Tensor) -> float:
    """The smallest share of the samples [N, D] that any mode claims, each sample counted for its nearest centre of
    `centers` [K, D]: 1/K for a balanced sampler, near 0 when a mode is dropped (the boosting thesis's "mass on the
    missing mode" when that mode is the least populated one).

    Raises:
        ValueError: no samples.
    """
    if samples.shape[0] == 0:
        raise ValueError("min_mode_mass needs at least one sample")
    nearest = torch.cdist(samples.double().cpu(), centers.double().cpu()).argmin(1)
    return float(torch.bincount(nearest, minlength=centers.shape[0]).min()) / samples.shape[0]
