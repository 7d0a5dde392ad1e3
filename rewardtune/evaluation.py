"""Evaluators: the metrics of a run, computed from a backbone (and its reward), plus the pictures people look at.

`ToyEvaluator` (2D data): sliced Wasserstein-2 between model samples and fresh data, repeated (mean and std), and,
when the reward is an energy, the AUC of the energy for data against uniform noise. Its plot is the paper's
Figure 2: samples over the energy heat map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rewardtune.backbones.base import GaussianChainPolicy, Guide
from rewardtune.metrics.auc import energy_auc, uniform_box
from rewardtune.metrics.sliced_wasserstein import sliced_wasserstein
from rewardtune.rewards.base import Reward


@dataclass
class ToyEvaluator:
    """Metrics `sliced_wasserstein`, `sliced_wasserstein_std` and (with an energy) `energy_auc`.

    Args:
        data: the data source (`sample(n, generator)` and `sample_shape`).
        num_samples: samples per evaluation (10k in the paper).
        repeats: independent samplings averaged for SW (5 in the paper).
        num_projections: SW projections (1,000 in the paper).
        auc_half_width: the uniform noise box for the AUC is [-w, w]^D (4.1 in the paper's 2D experiment).
        sample_batch: chains sampled at once.
    """

    data: object
    num_samples: int = 10000
    repeats: int = 5
    num_projections: int = 1000
    auc_half_width: float = 4.1
    sample_batch: int = 10000

    def draw(self, backbone: GaussianChainPolicy, n: int, generator, guide: Guide | None = None) -> torch.Tensor:
        return draw_samples(backbone, n, generator, guide, self.sample_batch)

    def evaluate(
        self, backbone: GaussianChainPolicy, reward: Reward | None, seed: int, guide: Guide | None = None
    ) -> dict[str, float]:
        """Metrics of `backbone` (and `reward`); every random draw derives from `seed`."""
        cpu_gen, gen = generators(seed, backbone.device)
        sws = []
        for _ in range(self.repeats):
            fake = self.draw(backbone, self.num_samples, gen, guide)
            real = self.data.sample(self.num_samples, cpu_gen)
            sws.append(sliced_wasserstein(fake, real, num_projections=self.num_projections, generator=cpu_gen))
        sw = torch.tensor(sws, dtype=torch.float64)
        metrics = {
            "sliced_wasserstein": float(sw.mean()),
            "sliced_wasserstein_std": float(sw.std(unbiased=False)) if len(sws) > 1 else 0.0,
        }
        if reward is not None and getattr(reward, "learns", False):
            metrics["energy_auc"] = self.auc(backbone, reward, cpu_gen)
        return metrics

    @torch.no_grad()
    def auc(self, backbone: GaussianChainPolicy, reward: Reward, generator) -> float:
        device = backbone.device
        real = self.data.sample(self.num_samples, generator).to(device)
        noise = uniform_box(self.num_samples, real[0].numel(), self.auc_half_width, generator).to(device)
        return energy_auc(reward.cost(real).cpu(), reward.cost(noise.view_as(real)).cpu())

    def plot(self, backbone: GaussianChainPolicy, reward: Reward | None, path: Path, seed: int, title: str = "") -> None:
        """Samples over the energy heat map (the paper's Figure 2); samples over data when there is no energy."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cpu_gen, gen = generators(seed, backbone.device)
        fake = self.draw(backbone, 2000, gen).numpy()
        w = self.auc_half_width
        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        if reward is not None and getattr(reward, "learns", False):
            grid = torch.linspace(-w, w, 200)
            xx, yy = torch.meshgrid(grid, grid, indexing="xy")
            pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1).to(backbone.device)
            with torch.no_grad():
                energy = reward.cost(pts).cpu().view(200, 200)
            ax.imshow(energy.numpy(), extent=(-w, w, -w, w), origin="lower", cmap="Reds", alpha=0.9)
        else:
            real = self.data.sample(2000, cpu_gen).numpy()
            ax.scatter(real[:, 0], real[:, 1], s=2, c="tab:gray", alpha=0.4, label="data")
        ax.scatter(fake[:, 0], fake[:, 1], s=2, c="tab:blue", alpha=0.6, label="samples")
        ax.set_xlim(-w, w)
        ax.set_ylim(-w, w)
        ax.set_aspect("equal")
        ax.set_title(title or "samples over energy (white = low)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def draw_samples(
    backbone: GaussianChainPolicy, n: int, generator, guide: Guide | None, batch: int, clamp: float | None = None
) -> torch.Tensor:
    """n samples x_T on the CPU, drawn `batch` chains at a time; `generator` lives on the backbone's device."""
    chunks = []
    for start in range(0, n, batch):
        x = backbone.sample(min(batch, n - start), generator, guide=guide).final
        chunks.append((x.clamp(-clamp, clamp) if clamp is not None else x).cpu())
    return torch.cat(chunks)


def generators(seed: int, device) -> tuple[torch.Generator, torch.Generator]:
    """A CPU generator (data, projections) and one on `device` (sampling), both seeded from `seed`."""
    return torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed + 1)


def round_metrics(metrics: dict[str, float], digits: int = 6) -> dict[str, float]:
    return {k: (round(v, digits) if math.isfinite(v) else v) for k, v in metrics.items()}
