"""Evaluators: the metrics of a run, computed from a backbone (and its reward), plus the pictures people look at.

`ToyEvaluator` (2D data): sliced Wasserstein-2 between model samples and fresh data, repeated (mean and std), the
fraction of modes covered for a Gaussian mixture (`mode_coverage`: >= 1% of the samples within 2 sigma) and the
smallest share of the samples any mode holds (`min_mode_mass`), and,
when the reward is an energy, the AUC of the energy for data against uniform noise; for a reward that does not
learn, its mean over the samples. Its plot is the paper's Figure 2: samples over the energy heat map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rewardtune.backbones.base import GaussianChainPolicy, Guide
from rewardtune.conditional_evaluation import (
    class_accuracy,
    per_condition_count,
    reward_metrics_by_split,
)
from rewardtune.conditions import Conditions
from rewardtune.metrics.auc import energy_auc, uniform_box
from rewardtune.metrics.modes import min_mode_mass, mode_coverage
from rewardtune.metrics.sliced_wasserstein import sliced_wasserstein
from rewardtune.precision import at_least_fp32
from rewardtune.rewards.base import Reward, check_reward_output, reward_name


@dataclass
class ToyEvaluator:
    """Metrics `sliced_wasserstein`, `sliced_wasserstein_std`, for a Gaussian-mixture data source `mode_coverage` and
    `min_mode_mass` (of the last repeat's samples), with an energy `energy_auc`, and with a reward that does not learn `reward_mean` and the
    reward's own `evaluation_metrics`.

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

    def draw(
        self, backbone: GaussianChainPolicy, n: int, generator, guide: Guide | None = None, condition=None
    ) -> torch.Tensor:
        return draw_samples(backbone, n, generator, guide, self.sample_batch, condition)

    def evaluate(
        self, backbone: GaussianChainPolicy, reward: Reward | None, seed: int, guide: Guide | None = None,
        conditions=None,
    ) -> dict[str, float]:
        """Metrics of `backbone` (and `reward`); every random draw derives from `seed`. A conditional run's samples
        cover its training conditions equally (`conditions`, the run's ConditionSupply), and add `class_accuracy`
        when the data can classify, and the reward's metrics under each sample's condition."""
        cpu_gen, gen = generators(seed, backbone.device)
        condition = None
        if conditions is not None:
            per = per_condition_count(self.num_samples, conditions)
            condition = conditions.evaluation_conditions("train", per, backbone.device)
        n = self.num_samples if condition is None else len(condition)
        sws = []
        for _ in range(self.repeats):
            fake = self.draw(backbone, n, gen, guide, condition)
            real = self.data.sample(n, cpu_gen)
            sws.append(sliced_wasserstein(fake, real, num_projections=self.num_projections, generator=cpu_gen))
        sw = torch.tensor(sws, dtype=torch.float64)
        metrics = {
            "sliced_wasserstein": float(sw.mean()),
            "sliced_wasserstein_std": float(sw.std(unbiased=False)) if len(sws) > 1 else 0.0,
        }
        if hasattr(self.data, "centers") and hasattr(self.data, "mode_std"):  # a Gaussian mixture: modes covered
            metrics["mode_coverage"] = mode_coverage(fake, self.data.centers, self.data.mode_std)
            metrics["min_mode_mass"] = min_mode_mass(fake, self.data.centers)
        if condition is not None and condition.labels is not None and hasattr(self.data, "classify"):
            metrics.update(class_accuracy(self.data.classify(fake), condition))
        if reward is not None and getattr(reward, "learns", False):
            if condition is None:  # the AUC of an unconditional energy: data against uniform noise
                metrics["energy_auc"] = self.auc(backbone, reward, cpu_gen)
        elif reward is not None and condition is not None:
            draw = lambda c: self.draw(backbone, len(c), gen, guide, c)
            metrics.update(reward_metrics_by_split(reward, conditions, condition, fake, per, draw, backbone.device))
        elif reward is not None:
            metrics.update(reward_metrics(reward, fake.to(backbone.device)))
        return metrics

    def metric_names(self, reward: Reward | None) -> set[str]:
        """The names `evaluate` reports with `reward` (checked against `eval.keep_best` before training)."""
        names = {"sliced_wasserstein", "sliced_wasserstein_std"}
        if hasattr(self.data, "centers") and hasattr(self.data, "mode_std"):
            names |= {"mode_coverage", "min_mode_mass"}
        if reward is not None and getattr(reward, "learns", False):
            names.add("energy_auc")
        elif reward is not None:  # a reward's own evaluation_metrics are named by calling it on a few data points
            with torch.no_grad():
                names |= {"reward_mean", *reward.evaluation_metrics(self.data.sample(8, torch.Generator().manual_seed(0)))}
        return names

    @torch.no_grad()
    def auc(self, backbone: GaussianChainPolicy, reward: Reward, generator) -> float:
        """AUC of the energy separating data from uniform noise in [-w, w]^D; both go through `backbone.output`, the
        space the energy is trained in (the identity for vectors)."""
        device = backbone.device
        real = self.data.sample(self.num_samples, generator).to(device)
        noise = uniform_box(self.num_samples, real[0].numel(), self.auc_half_width, generator).to(device).view_as(real)
        e_real, e_noise = (reward.cost(backbone.output(x)).cpu() for x in (real, noise))
        return energy_auc(e_real, e_noise)

    def plot(
        self, backbone: GaussianChainPolicy, reward: Reward | None, path: Path, seed: int, title: str = "",
        conditions=None,
    ) -> None:
        """Write `figure(...)` to `path` (PNG)."""
        import matplotlib.pyplot as plt

        fig = self.figure(backbone, reward, seed, title, conditions)
        fig.savefig(path)
        plt.close(fig)

    def figure(self, backbone: GaussianChainPolicy, reward: Reward | None, seed: int, title: str = "", conditions=None):
        """The paper's Figure 2: `PLOT_SAMPLES` samples over the energy heat map (with a colour bar) when the reward
        is a learned energy, over data otherwise, in the window [-w, w]^2 (w = `auc_half_width`). Samples outside
        the window are drawn on its border as crosses, counted in the legend and the title."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cpu_gen, gen = generators(seed, backbone.device)
        condition = None
        if conditions is not None:  # every condition equally; an energy is drawn without one (its null condition)
            per = per_condition_count(PLOT_SAMPLES, conditions)
            condition = conditions.evaluation_conditions("train", per, backbone.device)
        fake = self.draw(backbone, PLOT_SAMPLES if condition is None else len(condition), gen, None, condition)
        w = self.auc_half_width
        energy = reward is not None and getattr(reward, "learns", False) and condition is None
        fig, ax = plt.subplots(figsize=(5.8 if energy else 5, 5), dpi=100, layout="constrained")
        if energy:
            image = ax.imshow(
                self.energy_grid(backbone, reward).numpy(), extent=(-w, w, -w, w), origin="lower", cmap="Reds", alpha=0.9
            )
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=getattr(reward, "cost_label", COST_LABEL))
        else:
            real = self.data.sample(PLOT_SAMPLES, cpu_gen).numpy()
            ax.scatter(real[:, 0], real[:, 1], s=2, c="tab:gray", alpha=0.4, label="data")
        outside = outside_window(fake, w)
        inside = fake[~outside].numpy()
        ax.scatter(inside[:, 0], inside[:, 1], s=2, c="tab:blue", alpha=0.6, label="samples")
        n_out = int(outside.sum())
        if n_out:
            border = fake[outside].clamp(-w, w).numpy()
            ax.scatter(border[:, 0], border[:, 1], s=10, marker="x", c="black", linewidths=0.8, clip_on=False,
                       label=f"{n_out} outside, drawn at the border")
        ax.legend(loc="upper right", markerscale=2.5, fontsize="small", framealpha=0.8)
        ax.set_xlim(-w, w)
        ax.set_ylim(-w, w)
        ax.set_aspect("equal")
        heading = title or ("samples over the energy" if energy else "samples over data")
        ax.set_title(heading + (f"\n{outside_note(n_out, len(fake), w)}" if n_out else ""), fontsize="medium")
        return fig

    @torch.no_grad()
    def energy_grid(self, backbone: GaussianChainPolicy, reward: Reward, size: int = 200) -> torch.Tensor:
        """E(x) [size, size] on a regular grid of [-w, w]^2 (rows: y, columns: x), through `backbone.output`."""
        w = self.auc_half_width
        grid = torch.linspace(-w, w, size)
        xx, yy = torch.meshgrid(grid, grid, indexing="xy")
        pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1).to(backbone.device)
        return reward.cost(backbone.output(pts)).cpu().view(size, size)


PLOT_SAMPLES = 2000  # samples in a ToyEvaluator plot
COST_LABEL = "energy E(x) (white: low)"  # the heat map's colour bar: the cost a learned energy gives (DxMI's E)
REWARD_SAMPLES = 2000  # samples whose mean reward is `reward_mean`


def outside_window(points: torch.Tensor, half_width: float) -> torch.Tensor:
    """Which points [N, D] lie outside the box [-w, w]^D: a bool mask [N]."""
    return (points.abs() > half_width).any(dim=1)


def outside_note(n_outside: int, n: int, half_width: float) -> str:
    """The plot's note, e.g. "12 of 2000 samples outside [-4.1, 4.1]² (crosses at the border)"."""
    return f"{n_outside} of {n} samples outside [-{half_width:g}, {half_width:g}]² (crosses at the border)"


@torch.no_grad()
def reward_metrics(reward: Reward, samples: torch.Tensor) -> dict[str, float]:
    """`reward_mean` over the first REWARD_SAMPLES of `samples` [N, ...] (on the reward's device) and the reward's
    own `evaluation_metrics` of all of them, for a reward that does not learn."""
    head = samples[:REWARD_SAMPLES]
    rewards = check_reward_output(reward_name(reward), reward(head), head.shape[0])
    return {"reward_mean": float(rewards.mean()), **reward.evaluation_metrics(samples)}

def draw_samples(
    backbone: GaussianChainPolicy,
    n: int,
    generator,
    guide: Guide | None,
    batch: int,
    condition: Conditions | None = None,
) -> torch.Tensor:
    """n samples `backbone.output(x_T)` [n, *sample_shape] on the CPU (what metrics, rewards and `rewardtune sample`
    see), drawn `batch` chains at a time, chain i under row i of `condition` (n rows, or None); `generator` lives on
    the backbone's device."""
    if condition is not None and len(condition) != n:
        raise ValueError(f"{len(condition)} conditions for {n} samples")
    chunks = []
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        c = None if condition is None else condition.select(list(range(start, stop)))
        x = backbone.sample(stop - start, generator, guide=guide, condition=c).final
        chunks.append(at_least_fp32(backbone.output(x)).cpu())  # whatever precision decoded it
    return torch.cat(chunks)


def generators(seed: int, device) -> tuple[torch.Generator, torch.Generator]:
    """A CPU generator (data, projections) and one on `device` (sampling), both seeded from `seed`."""
    return torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed + 1)


def round_metrics(metrics: dict[str, float], digits: int = 6) -> dict[str, float]:
    return {k: (round(v, digits) if math.isfinite(v) else v) for k, v in metrics.items()}
