"""Standard anomaly detectors on the same spatial features the energy model sees, for comparison tables.

Every detector fits on normal feature maps [N, D, h, w] (the caller has already projected each spatial vector onto
the unit sphere, `nets.autoencoder.to_sphere`) and scores feature maps with an energy map [M, h, w], higher meaning more
anomalous. The algorithms are sklearn's:
- `KNNDistance` ("knn"): mean Euclidean distance to the k nearest training spatial vectors (PatchCore-style, Roth et
  al. 2022, without the coreset).
- `GaussianPerLocation` ("gaussian"): one Ledoit-Wolf Gaussian per spatial location, Mahalanobis distance (PaDiM,
  Defard et al. 2021).
- `IsolationForestDetector` ("isolation_forest"): an isolation forest (Liu et al. 2008) on all training spatial
  vectors, energy = -score_samples.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch


def _spatial_vectors(features: torch.Tensor) -> np.ndarray:
    """Feature maps [N, D, h, w] -> one row per spatial vector [N * h * w, D] float64 (row order n, i, j)."""
    d = features.shape[1]
    return features.detach().permute(0, 2, 3, 1).reshape(-1, d).cpu().double().numpy()


def _subsample(vectors: np.ndarray, max_train: int | None, seed: int) -> np.ndarray:
    """At most max_train rows of vectors [P, D], drawn without replacement by the seed (all rows when None)."""
    if max_train is None or len(vectors) <= max_train:
        return vectors
    rows = np.random.default_rng(seed).choice(len(vectors), size=max_train, replace=False)
    return vectors[np.sort(rows)]


class SpatialDetector:
    """The interface shared by the baselines: `fit(features) -> self`, `energy_map(features) -> [M, h, w]`.

    Subclasses implement `_fit(features)` and `_energy(features) -> np.ndarray [M, h, w]`; this class checks shapes.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.feature_shape: tuple[int, int, int] | None = None  # (D, h, w) seen by fit

    def _check(self, features: torch.Tensor, what: str) -> None:
        """Raises ValueError unless features is a floating-point [N, D, h, w] tensor."""
        if not isinstance(features, torch.Tensor) or features.dim() != 4 or not features.is_floating_point():
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"{self.name}.{what}: expected float feature maps [N, D, h, w], got {shape}")

    def fit(self, features: torch.Tensor) -> SpatialDetector:
        """Fit on normal feature maps [N, D, h, w]; returns self.

        Raises:
            ValueError: features are not floating [N, D, h, w], or too few for the detector.
        """
        self._check(features, "fit")
        if features.shape[0] == 0:
            raise ValueError(f"{self.name}.fit: no training feature maps (shape {tuple(features.shape)})")
        self._fit(features)
        self.feature_shape = tuple(features.shape[1:])
        return self

    def energy_map(self, features: torch.Tensor) -> torch.Tensor:
        """Energy of every spatial vector of feature maps [M, D, h, w]: [M, h, w] float32 on features' device,
        higher = more anomalous.

        Raises:
            ValueError: called before fit; features not floating [M, D, h, w]; D, h or w differ from fit's.
        """
        if self.feature_shape is None:
            raise ValueError(f"{self.name}.energy_map: call fit(features) first")
        self._check(features, "energy_map")
        if tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(f"{self.name}.energy_map: feature maps [M, D, h, w] = {tuple(features.shape)} do not "
                             f"match the [N, D, h, w] = [N, {', '.join(map(str, self.feature_shape))}] of fit")
        m, (_, h, w) = features.shape[0], self.feature_shape
        if m == 0:
            return torch.zeros(0, h, w, device=features.device)
        energy = self._energy(features)  # [M, h, w]
        return torch.from_numpy(np.ascontiguousarray(energy)).float().to(features.device)

    def _fit(self, features: torch.Tensor) -> None:
        raise NotImplementedError

    def _energy(self, features: torch.Tensor) -> np.ndarray:
        raise NotImplementedError


class KNNDistance(SpatialDetector):
    """Energy = mean Euclidean distance to the k nearest training spatial vectors (sklearn `NearestNeighbors`).

    Args:
        k: neighbours averaged over (>= 1).
        max_train: keep at most this many training vectors, drawn by `seed` (None: all N * h * w).
        seed: seeds the subsample.

    Raises:
        ValueError: k < 1, max_train < 1; at fit, fewer training vectors than k.
    """

    name = "knn"

    def __init__(self, k: int = 1, *, max_train: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if k < 1 or (max_train is not None and max_train < 1):
            raise ValueError(f"knn: k and max_train must be >= 1, got k={k}, max_train={max_train}")
        self.k, self.max_train, self.seed = k, max_train, seed

    def _fit(self, features: torch.Tensor) -> None:
        from sklearn.neighbors import NearestNeighbors

        vectors = _subsample(_spatial_vectors(features), self.max_train, self.seed)  # [P, D]
        if len(vectors) < self.k:
            raise ValueError(f"knn: k={self.k} neighbours but only {len(vectors)} training vectors")
        self.index = NearestNeighbors(n_neighbors=self.k).fit(vectors)

    def _energy(self, features: torch.Tensor) -> np.ndarray:
        distances, _ = self.index.kneighbors(_spatial_vectors(features))  # [M * h * w, k]
        return distances.mean(axis=1).reshape(features.shape[0], *features.shape[2:])


class GaussianPerLocation(SpatialDetector):
    """PaDiM-style: one Gaussian per spatial location (i, j), fitted on the N training vectors there with
    `sklearn.covariance.LedoitWolf`; energy = Mahalanobis distance sqrt((x - mu)^T Sigma^-1 (x - mu)).

    Raises:
        ValueError: at fit, fewer than 2 training feature maps.
    """

    name = "gaussian"

    def _fit(self, features: torch.Tensor) -> None:
        from sklearn.covariance import LedoitWolf

        if features.shape[0] < 2:
            raise ValueError(f"gaussian: needs >= 2 training feature maps to fit a covariance, got "
                             f"{features.shape[0]}")
        per_location = features.detach().flatten(2).permute(2, 0, 1).cpu().double().numpy()  # [h * w, N, D]
        self.gaussians = [LedoitWolf().fit(vectors) for vectors in per_location]

    def _energy(self, features: torch.Tensor) -> np.ndarray:
        per_location = features.detach().flatten(2).permute(2, 0, 1).cpu().double().numpy()  # [h * w, M, D]
        squared = np.stack([g.mahalanobis(v) for g, v in zip(self.gaussians, per_location)], axis=1)  # [M, h * w]
        return np.sqrt(np.maximum(squared, 0.0)).reshape(features.shape[0], *features.shape[2:])


class IsolationForestDetector(SpatialDetector):
    """An sklearn `IsolationForest` on all training spatial vectors; energy = -score_samples (higher = easier to
    isolate = more anomalous).

    Args:
        n_estimators: trees.
        seed: the forest's random_state and the subsample's seed.
        max_train: keep at most this many training vectors (None: all); each tree still draws its own 256.

    Raises:
        ValueError: n_estimators < 1, max_train < 1.
    """

    name = "isolation_forest"

    def __init__(self, n_estimators: int = 100, seed: int = 0, max_train: int | None = 100_000) -> None:
        super().__init__()
        if n_estimators < 1 or (max_train is not None and max_train < 1):
            raise ValueError(f"isolation_forest: n_estimators and max_train must be >= 1, got {n_estimators}, "
                             f"{max_train}")
        self.n_estimators, self.seed, self.max_train = n_estimators, seed, max_train

    def _fit(self, features: torch.Tensor) -> None:
        from sklearn.ensemble import IsolationForest

        vectors = _subsample(_spatial_vectors(features), self.max_train, self.seed)  # [P, D]
        self.forest = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed).fit(vectors)

    def _energy(self, features: torch.Tensor) -> np.ndarray:
        scores = self.forest.score_samples(_spatial_vectors(features))  # [M * h * w], lower = more abnormal
        return -scores.reshape(features.shape[0], *features.shape[2:])


BASELINES: dict[str, type[SpatialDetector]] = {
    "knn": KNNDistance,
    "gaussian": GaussianPerLocation,
    "isolation_forest": IsolationForestDetector,
}
