"""Data `anomaly_features`: the spatial feature vectors of an anomaly-detection set's normal images, on the unit
sphere (DxMI §5.3: "treating every spatial feature from the training images as normal training data").

A source (`anomaly/sets.py`: MVTec-AD's folder layout, or the offline digits benchmarks) gives images; a frozen CNN
(`anomaly/features.py`) turns each into a map [D, h, w]; each of the N * h * w training vectors is one data point,
drawn uniformly by `sample`. The test images' maps, labels and masks stay with the data for the evaluator
(`anomaly/evaluation.py`), which this data declares through `make_evaluator`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from rewardtune.anomaly.features import (
    FeatureExtractor,
    build_feature_extractor,
    cached_features,
    extract_features,
)
from rewardtune.errors import RecipeError

DEFAULT_EXTRACTOR = {"mvtec": "efficientnet_b4", "digits_defects": "digits_cnn", "digits_novelty": "digits_cnn"}


class AnomalyFeatures:
    """Training vectors [N * h * w, D] on the sphere, plus the test maps of the same extractor.

    Attributes:
        anomaly_set: the images, labels, masks and categories (`anomaly.sets.AnomalySet`).
        extractor: the frozen FeatureExtractor (scoring new images uses the same one).
        train_maps: [N, D, h, w] features of the normal training images, unit vectors along D.
        test_maps: [M, D, h, w] features of the test images.
        vectors: [N * h * w, D], the data points.
    """

    def __init__(self, anomaly_set, extractor: FeatureExtractor, train_maps: torch.Tensor, test_maps: torch.Tensor):
        self.anomaly_set, self.extractor = anomaly_set, extractor
        self.train_maps, self.test_maps = train_maps, test_maps
        self.vectors = train_maps.permute(0, 2, 3, 1).reshape(-1, train_maps.shape[1]).contiguous()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.vectors.shape[1],)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """n training vectors drawn uniformly with replacement: [n, D]. The indices are drawn on the generator's
        device (a CUDA rollout generator works)."""
        where = generator.device if generator is not None else "cpu"
        idx = torch.randint(0, self.vectors.shape[0], (n,), generator=generator, device=where).cpu()
        return self.vectors[idx].to(device)

    def make_evaluator(self, cfg):
        """The evaluator of this data: image and pixel AUROC of the energy on the test set (`anomaly/evaluation.py`).

        Raises:
            RecipeError: [eval] settings it has no use for (repeats, the Fréchet distance's feature_extractor and
                reference_samples), so none is recorded and ignored.
        """
        from rewardtune.anomaly.evaluation import AnomalyEvaluator

        defaults = type(cfg)()  # the [eval] dataclass with its defaults
        for key in ("repeats", "feature_extractor", "reference_samples"):
            if getattr(cfg, key) != getattr(defaults, key):
                raise RecipeError(f"eval.{key} does not apply to anomaly detection (AUROCs of the energy on the test "
                                  "images, the samples' sliced Wasserstein distance): drop it")
        return AnomalyEvaluator(self, num_samples=cfg.num_samples)


def build_anomaly_features(
    reporter=None,
    /,
    *,
    source: Literal["mvtec", "digits_defects", "digits_novelty"] = "mvtec",
    root: str = "data/mvtec_anomaly_detection",
    categories: list[str] | None = None,
    image_size: int = 224,
    held_out: int = 0,
    defects_seed: int = 0,
    extractor: str = "",
    layers: list[int] | None = None,
    grid: int = 14,
    pretrained: bool = True,
    weights: str = "",
    cache: bool = True,
    batch_size: int = 32,
) -> AnomalyFeatures:
    """Data `anomaly_features`.

    Args:
        source: "mvtec" (the folder `root` in MVTec-AD's layout; all `categories` trained together, UniAD's unified
            setting; images resized to `image_size`), "digits_defects" (sklearn digits at 32 x 32 with synthetic
            defects and exact masks, `defects_seed`) or "digits_novelty" (digit `held_out` left out of training).
        extractor: a timm model name, "digits_cnn" or "pkg.module:factory" (anomaly/features.py); "" picks the
            source's default (MVTec: "efficientnet_b4", the paper's; digits: "digits_cnn").
        layers: the timm stages (`out_indices`, default [0, 1, 2, 3]: 272 channels for EfficientNet-b4); grid: the
            common spatial size (14: 272 x 14 x 14 at 224²); pretrained / weights: ImageNet weights from the hub or
            a local file.
        cache: keep the features as safetensors under $REWARDTUNE_CACHE/anomaly_features (keyed by these settings;
            a user factory is keyed by its name only: set cache = false after changing its code).
        reporter: the run's progress reporter (context), which shows the extraction's progress.

    Raises:
        RecipeError: one line: a missing or malformed folder, an extractor that cannot be built or loaded (offline).
    """
    from rewardtune.anomaly import sets

    spec = extractor or DEFAULT_EXTRACTOR[source]
    layers = [0, 1, 2, 3] if layers is None else list(layers)
    if source == "mvtec":
        anomaly_set = sets.load_mvtec(root, categories=categories, image_size=image_size)
    elif source == "digits_defects":
        anomaly_set = sets.make_digits_defects(seed=defects_seed)
    elif source == "digits_novelty":
        anomaly_set = sets.make_digits_novelty(held_out)
    else:
        raise RecipeError(f"unknown anomaly source {source!r}: expected mvtec, digits_defects or digits_novelty")
    net = build_feature_extractor(
        spec, layers=layers, grid=grid, image_size=image_size if source == "mvtec" else None,
        pretrained=pretrained, weights=weights,
    )
    settings = {
        "source": source, "root": str(Path(root).resolve()) if source == "mvtec" else "", "categories": categories,
        "image_size": image_size, "held_out": held_out, "defects_seed": defects_seed, "extractor": spec,
        "layers": layers, "grid": grid, "pretrained": pretrained, "weights": file_identity(weights),
        "sizes": [tuple(anomaly_set.train.shape), tuple(anomaly_set.test.shape)],
    }

    def compute() -> dict[str, torch.Tensor]:
        return {
            "train": extract_features(net, anomaly_set.train, batch_size=batch_size, reporter=reporter,
                                      description=f"features of the training images ({spec})"),
            "test": extract_features(net, anomaly_set.test, batch_size=batch_size, reporter=reporter,
                                     description=f"features of the test images ({spec})"),
        }

    check_test_categories(anomaly_set)
    maps = cached_features(settings, compute, cache)
    return AnomalyFeatures(anomaly_set, net, maps["train"], maps["test"])


def check_test_categories(anomaly_set) -> None:
    """Every test category needs normal and anomalous images: its AUROC is undefined otherwise."""
    for category in dict.fromkeys(anomaly_set.categories):
        labels = {int(y) for y, c in zip(anomaly_set.labels, anomaly_set.categories) if c == category}
        if labels != {0, 1}:
            kind = "anomalous" if 0 in labels else "normal"
            raise RecipeError(f"{anomaly_set.name}: test category {category!r} has no {kind} images, so no AUROC")


def file_identity(path: str) -> str:
    """A weights file as a cache key: its path, size and modification time ("" for none)."""
    if not path:
        return ""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
