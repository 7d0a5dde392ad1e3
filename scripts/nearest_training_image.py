"""Do a digits run's samples copy the training images? Distances to the nearest of sklearn's 1,797 digits.

Usage: python scripts/nearest_training_image.py RUN [RUN ...] [--n 2000]
For each run (its EMA weights when it keeps them), draws n samples and prints the RMS pixel distance (in [-1, 1]
units) from each to its nearest training image: median, 10th percentile and the fraction closer than 0.1. The last
line is the same for each training image against the others, the scale of "different images of one dataset".
A generator that memorises would show much smaller distances than the data's own line.
"""

import argparse

import torch

from rewardtune.api import load_run
from rewardtune.data.images import load_digits_images

parser = argparse.ArgumentParser()
parser.add_argument("runs", nargs="+")
parser.add_argument("--n", type=int, default=2000)
args = parser.parse_args()

data = load_digits_images().flatten(1)


def report(name: str, distances: torch.Tensor) -> None:
    print(
        f"{name:40s} median {distances.median():.3f}  10th percentile {distances.quantile(0.1):.3f}  "
        f"closer than 0.1: {(distances < 0.1).float().mean():.3f}"
    )


for run in args.runs:
    trainer = load_run(run)
    backbone = trainer.evaluated_backbone()
    samples = trainer.evaluator.draw(backbone, args.n, torch.Generator(device=backbone.device).manual_seed(1)).flatten(1)
    report(run, torch.cdist(samples, data).min(1).values / data.shape[1] ** 0.5)
between = torch.cdist(data, data)
between.fill_diagonal_(float("inf"))
report("training images, each against the others", between.min(1).values / data.shape[1] ** 0.5)
