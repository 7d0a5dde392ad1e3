"""A trained anomaly-detection run as a scorer: its frozen feature extractor and its learned energy.

This module sits at the API level (it loads a run through `api.load_run`); the scoring functions it serves
(`anomaly/scoring.py`) and `rewardtune score` only need the `AnomalyModel` protocol it implements.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rewardtune.anomaly.evaluation import energy_maps
from rewardtune.anomaly.features import FeatureExtractor, extract_features
from rewardtune.errors import RecipeError


class RunAnomalyModel:
    """images [N, C, H, W] in [0, 1] -> energy maps [N, h, w] (higher = more anomalous).

    Args:
        extractor: the run's FeatureExtractor (features projected to the sphere, as in training).
        energy: the run's reward (its `cost` is the energy).
    """

    def __init__(self, extractor: FeatureExtractor, energy) -> None:
        self.extractor, self.energy = extractor, energy
        self.image_channels = extractor.channels
        self.image_size = extractor.image_size

    @torch.no_grad()
    def energy_map(self, images: torch.Tensor) -> torch.Tensor:
        return energy_maps(self.energy, extract_features(self.extractor, images))


def load_anomaly_model(run_dir: str | Path, *, best: bool = False) -> RunAnomalyModel:
    """The scorer of a run trained on `anomaly_features` data (its latest checkpoint, or the best one).

    Raises:
        RecipeError: the run's data are not anomaly features, or it has no energy.
        CheckpointError: no checkpoint (or no best one with `best`).
    """
    from rewardtune.api import load_run
    from rewardtune.data.anomaly import AnomalyFeatures

    trainer = load_run(run_dir, best=best)  # the autoencoder's pretraining is skipped: the checkpoint holds it
    if not isinstance(trainer.data, AnomalyFeatures):
        raise RecipeError(f"{run_dir} was not trained on [data] kind = \"anomaly_features\": nothing to score images with")
    if trainer.reward is None:
        raise RecipeError(f"{run_dir} has no reward: no energy to score images with")
    trainer.reward.eval()
    return RunAnomalyModel(trainer.data.extractor, trainer.reward)
