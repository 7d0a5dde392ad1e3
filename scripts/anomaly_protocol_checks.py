"""Two checks on the digits defects benchmark's AUROCs: pooled over the test set against the MVTec-style mean over
categories (here the ten digit classes), and the pixel AUROC an ideal map on the feature grid would reach.

    python scripts/anomaly_protocol_checks.py RUN[@STEP] [RUN[@STEP] ...] [--grid 8]

Each RUN is an `anomaly_digits_defects` run (its latest checkpoint, or the kept one of STEP). For each it prints image
and pixel AUROC of its energy pooled over the 297 test digits (what the run's evaluation reports: one category,
"digits") and as the mean over the digit classes (about 30 test images each, half with a defect), as MVTec-AD's
per-category protocol would. The "grid ceiling" is the pixel AUROC of the defect fraction of each cell of a
grid x grid map, upsampled bilinearly like the energies: what an energy that were exactly right on the grid scores.
"E ratio" is the mean energy of the normal test digits over that of the training digits (above 1: the energy
prefers the digits it was trained on).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from rewardtune.anomaly.evaluation import energy_maps
from rewardtune.anomaly.scoring import (
    image_scores,
    localisation_maps,
    per_category_auroc,
    pixel_auroc,
)
from rewardtune.anomaly.sets import make_digits_defects
from rewardtune.api import load_run
from rewardtune.nets.digits import TRAIN_COUNT


def pooled_and_per_class(run: str, step: int | None) -> tuple[dict, dict, float]:
    """({image_auroc, pixel_auroc} pooled, the same averaged over the test digits' classes, the mean energy of the
    normal test digits' vectors over that of the training digits') for one checkpoint."""
    trainer = load_run(run, step=step)
    anomaly_set = trainer.data.anomaly_set
    maps = energy_maps(trainer.reward, trainer.data.test_maps)  # [M, h, w]
    pixel = localisation_maps(maps, tuple(anomaly_set.test.shape[-2:]))
    scores = image_scores(maps)
    pooled = per_category_auroc(scores, anomaly_set.labels, anomaly_set.categories, pixel, anomaly_set.masks)
    from sklearn.datasets import load_digits

    classes = [f"digit_{c}" for c in load_digits().target[TRAIN_COUNT:].tolist()]  # the test digits' classes
    per_class = per_category_auroc(scores, anomaly_set.labels, classes, pixel, anomaly_set.masks)
    normal = maps[anomaly_set.labels == 0].mean()
    train = energy_maps(trainer.reward, trainer.data.train_maps).mean()
    return pooled["mean"], per_class["mean"], float(normal / train)


def grid_ceiling(grid: int, seed: int = 0) -> float:
    """Pixel AUROC of the ideal grid x grid map (each cell's defect fraction) on the defects set of `seed`."""
    anomaly_set = make_digits_defects(seed=seed)
    size = anomaly_set.masks.shape[-1]
    cells = F.adaptive_avg_pool2d(anomaly_set.masks.float().unsqueeze(1), grid).squeeze(1)  # [M, grid, grid]
    return pixel_auroc(localisation_maps(cells, (size, size)), anomaly_set.masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="RUN or RUN@STEP")
    parser.add_argument("--grid", type=int, default=8, help="the feature grid's side (the digits CNN's: 8)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print("| run | image AUROC, pooled | pixel AUROC, pooled | image AUROC, mean over classes | pixel AUROC, mean over classes "
          "| E ratio |")
    print("|---|---|---|---|---|---|")
    for spec in args.runs:
        run, _, step = spec.partition("@")
        pooled, per_class, ratio = pooled_and_per_class(run, int(step) if step else None)
        print(f"| {spec} | {pooled['image_auroc']:.3f} | {pooled['pixel_auroc']:.3f} | {per_class['image_auroc']:.3f} | "
              f"{per_class['pixel_auroc']:.3f} | {ratio:.2f} |", flush=True)
    print(f"\ngrid ceiling ({args.grid} x {args.grid}): pixel AUROC {grid_ceiling(args.grid):.4f}")


if __name__ == "__main__":
    main()
