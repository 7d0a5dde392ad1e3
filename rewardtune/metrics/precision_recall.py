"""Improved precision and recall (Kynkäänniemi et al. 2019) on features, with k-nearest-neighbour manifolds.

A set's manifold is the union of balls around its points with radius the distance to the k-th nearest neighbour
in the same set. Precision: fraction of fake points inside the real manifold; recall: fraction of real points
inside the fake manifold.
"""

from __future__ import annotations

import torch

NEIGHBOURS = 3  # k of the k-NN manifolds (the paper's default); a set needs at least k + 1 points


def knn_radii(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point: [N]."""
    radii = []
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(x[start : start + chunk], x)  # [c, N]; the zero self-distance is the first neighbour
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    """Fraction of `queries` within radius of at least one support point."""
    inside = []
    for start in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[start : start + chunk], support)  # [c, M]
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = NEIGHBOURS) -> tuple[float, float]:
    real, fake = real.double(), fake.double()
    precision = coverage(fake, real, knn_radii(real, k))
    recall = coverage(real, fake, knn_radii(fake, k))
    return precision, recall
