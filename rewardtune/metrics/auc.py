"""Energy AUC: how well an energy separates data from uniform noise (the DxMI paper's Table 1, AUC column).

Score = -E(x) (low energy means data-like); AUC of data (positive) vs uniform samples on a box (negative).
"""

from __future__ import annotations

import torch
from sklearn.metrics import roc_auc_score


def uniform_box(n: int, dim: int, half_width: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points uniform on [-half_width, half_width]^dim."""
    return (torch.rand((n, dim), generator=generator) * 2 - 1) * half_width


def energy_auc(energy_data: torch.Tensor, energy_noise: torch.Tensor) -> float:
    """ROC AUC of scores -E for data (label 1) against noise (label 0)."""
    scores = torch.cat([-energy_data, -energy_noise]).double().cpu().numpy()
    labels = [1] * energy_data.shape[0] + [0] * energy_noise.shape[0]
    return float(roc_auc_score(labels, scores))
