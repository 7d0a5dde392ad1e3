"""Sliced Wasserstein-2 distance between two empirical distributions (the DxMI paper's 2D metric, Appendix C.1).

SW_2(x, y) = sqrt( E_theta W_2^2(theta^T x, theta^T y) ), theta uniform on the unit sphere, estimated with
`num_projections` random directions; each 1-D W_2^2 between equal-size samples is the mean squared difference of the
sorted projections.

The projections are sorted with numpy on the host (numpy's sort of float64 rows is several times faster than
torch's on the CPU; the sorted values are the same), one contiguous row per direction.
"""

from __future__ import annotations

import numpy as np
import torch


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, *, num_projections: int = 1000, generator: torch.Generator | None = None
) -> float:
    """SW_2 between samples x [N, D] and y [N, D] (equal N)."""
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.flatten(1).double(), y.flatten(1).double()
    theta = torch.randn((x.shape[1], num_projections), generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)  # [D, P], unit directions
    px, py = sorted_rows(x @ theta), sorted_rows(y @ theta)  # [P, N] each
    return float(np.sqrt(np.mean(np.square(px - py))))


def sorted_rows(projections: torch.Tensor) -> np.ndarray:
    """The projections [N, P] of N points on P directions, sorted per direction: a float64 array [P, N]."""
    return np.sort(projections.detach().cpu().T.contiguous().numpy(), axis=1)
