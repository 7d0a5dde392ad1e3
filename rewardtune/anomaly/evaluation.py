"""`AnomalyEvaluator`: how well a learned energy detects and localises anomalies (DxMI §5.3, Table 5).

The energy scores every spatial feature vector of every test image: an energy map [M, h, w]. The image's anomaly
score is the map's maximum (max-pooling) and its localisation map the energy map upsampled bilinearly to the image
size; both are scored by AUROC per category (sklearn), and the mean over categories is what Table 5 reports. The
sampler is reported beside them: the sliced Wasserstein distance between its samples and the training vectors, and
the mean energy of each.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rewardtune.anomaly.scoring import (
    image_scores,
    localisation_maps,
    per_category_auroc,
)
from rewardtune.evaluation import draw_samples, generators
from rewardtune.metrics.sliced_wasserstein import sliced_wasserstein

PLOT_IMAGES = 6


@torch.no_grad()
def energy_maps(energy, maps: torch.Tensor, *, batch_size: int = 65536) -> torch.Tensor:
    """Energies of every spatial vector of feature maps [M, D, h, w]: [M, h, w]. `energy(x [B, D]) -> [B]` (a
    reward's `cost`), evaluated in chunks of `batch_size` vectors on the energy's device."""
    m, d, h, w = maps.shape
    vectors = maps.permute(0, 2, 3, 1).reshape(-1, d)
    device = next(iter(energy.parameters())).device if hasattr(energy, "parameters") else torch.device("cpu")
    cost = energy.cost if hasattr(energy, "cost") else energy
    out = [cost(vectors[i : i + batch_size].to(device)).float().cpu() for i in range(0, vectors.shape[0], batch_size)]
    return torch.cat(out).view(m, h, w)


def detection_metrics(maps: torch.Tensor, anomaly_set) -> dict[str, float]:
    """Image AUROC (and pixel AUROC when the set has masks) from energy maps [M, h, w] of its test images: the mean
    over categories as `image_auroc` / `pixel_auroc`, and per category as `image_auroc/<category>` when there are
    several."""
    size = tuple(anomaly_set.test.shape[-2:])
    masks = anomaly_set.masks
    pixel = localisation_maps(maps, size) if masks is not None else None
    table = per_category_auroc(image_scores(maps), anomaly_set.labels, anomaly_set.categories, pixel, masks)
    metrics = {f"{key}": value for key, value in table["mean"].items()}
    categories = [c for c in table if c != "mean"]
    if len(categories) > 1:
        for category in categories:
            metrics.update({f"{key}/{category}": value for key, value in table[category].items()})
    return metrics


class AnomalyEvaluator:
    """Metrics `image_auroc`, `pixel_auroc` (sets with masks), per-category AUROCs, `sliced_wasserstein` (samples
    against training vectors), `energy_data` and `energy_samples` (mean energies).

    Args:
        data: an `AnomalyFeatures` (data/anomaly.py).
        num_samples: sampler draws per evaluation (and training vectors they are compared with).
        num_projections: sliced-Wasserstein projections.
    """

    def __init__(self, data, *, num_samples: int = 10000, num_projections: int = 200) -> None:
        self.data, self.num_samples, self.num_projections = data, num_samples, num_projections

    def draw(self, backbone, n: int, generator, guide=None, condition=None) -> torch.Tensor:
        return draw_samples(backbone, n, generator, guide, min(n, 10000), condition)

    def evaluate(self, backbone, reward, seed: int, guide=None, conditions=None) -> dict[str, float]:
        cpu_gen, gen = generators(seed, backbone.device)
        fake = self.draw(backbone, self.num_samples, gen, guide).float().cpu()
        real = self.data.sample(self.num_samples, cpu_gen)
        metrics = {"sliced_wasserstein": sliced_wasserstein(fake, real, num_projections=self.num_projections,
                                                            generator=cpu_gen)}
        if reward is not None:
            metrics.update(detection_metrics(energy_maps(reward, self.data.test_maps), self.data.anomaly_set))
            with torch.no_grad():
                device = backbone.device
                metrics["energy_data"] = float(reward.cost(real.to(device)).mean())
                metrics["energy_samples"] = float(reward.cost(fake.to(device)).mean())
        return metrics

    def metric_names(self, reward) -> set[str]:
        names = {"sliced_wasserstein"}
        if reward is not None:
            names |= {"image_auroc", "energy_data", "energy_samples"}
            if self.data.anomaly_set.masks is not None:
                names.add("pixel_auroc")
        return names

    def plot(self, backbone, reward, path: Path, seed: int, title: str = "", conditions=None) -> None:
        """Test images with the energy's localisation map over them: anomalous ones (mask outlined) and normal ones."""
        import matplotlib.pyplot as plt

        if reward is None:
            return
        chosen = plot_indices(self.data.anomaly_set.labels, PLOT_IMAGES)
        maps = energy_maps(reward, self.data.test_maps[chosen])
        fig = localisation_figure(self.data.anomaly_set, chosen, maps, title)
        fig.savefig(path)
        plt.close(fig)


def plot_indices(labels: torch.Tensor, count: int) -> list[int]:
    """The first count/2 anomalous and first count/2 normal test images (fewer when a class has fewer)."""
    anomalous = torch.nonzero(labels == 1).flatten()[: count // 2].tolist()
    normal = torch.nonzero(labels == 0).flatten()[: count - len(anomalous)].tolist()
    return anomalous + normal


def localisation_figure(anomaly_set, chosen: list[int], maps: torch.Tensor, title: str = ""):
    """A row per image pair: the image (mask outlined in white) and its localisation map over it (shared colour
    scale, so images compare)."""
    import matplotlib.pyplot as plt

    size = tuple(anomaly_set.test.shape[-2:])
    heat = localisation_maps(maps, size)
    low, high = float(heat.min()), float(heat.max())
    fig, axes = plt.subplots(2, len(chosen), figsize=(2 * len(chosen), 4.2), squeeze=False)
    for col, index in enumerate(chosen):
        image = anomaly_set.test[index].permute(1, 2, 0).numpy()
        image = image[..., 0] if image.shape[-1] == 1 else image
        for row in range(2):
            axes[row, col].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[row, col].axis("off")
        axes[1, col].imshow(heat[col].numpy(), cmap="jet", alpha=0.5, vmin=low, vmax=high)
        if anomaly_set.masks is not None and anomaly_set.labels[index] == 1:
            axes[0, col].contour(anomaly_set.masks[index].numpy().astype(float), levels=[0.5], colors="white")
        label = anomaly_set.defect_types[index] if anomaly_set.labels[index] == 1 else "normal"
        axes[0, col].set_title(label, fontsize=8)
    fig.suptitle(title or "energy localisation")
    fig.tight_layout()
    return fig
