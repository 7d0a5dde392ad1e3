"""Evaluate a run's weights with its sampler at other numbers of steps (the few-step gap of a pretrained model).

    python scripts/eval_at_steps.py RUN_DIR 4,10,50 [--samples N] [--set KEY=VALUE ...]

For each T it rebuilds the run's recipe with `backbone.num_steps = T` and `backbone.init_from = RUN_DIR` (the same
schedule kind at T steps: FastDPM, strided, Karras), evaluates N samples (default 600) with the recipe's evaluator
on one thread and prints the main metrics and the time taken. Nothing is written.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rewardtune.api import build_trainer, make_recipe
from rewardtune.build import read_run_recipe

KEYS = ("sliced_wasserstein", "energy_auc", "frechet_distance", "diversity", "accuracy", "reward_mean", "held_out/accuracy",
        "class_accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("steps", help="comma-separated numbers of sampling steps, e.g. 4,10,50")
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for num_steps in (int(s) for s in args.steps.split(",")):
        start = time.time()
        tables = read_run_recipe(Path(args.run_dir))
        tables["backbone"].update(num_steps=num_steps, init_from=args.run_dir)
        tables.setdefault("eval", {})["num_samples"] = args.samples
        tables.setdefault("train", {})["cpu_threads"] = 1
        metrics = build_trainer(make_recipe(tables, args.overrides)).evaluate()
        shown = {k: round(metrics[k], 3) for k in KEYS if k in metrics}
        print(f"T = {num_steps}: {shown} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
