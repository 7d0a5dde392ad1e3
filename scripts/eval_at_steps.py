"""Evaluate a run's weights with its sampler at other numbers of steps (the few-step gap of a pretrained model).

    python scripts/eval_at_steps.py RUN_DIR 4,10,50 [NUM_SAMPLES] [--set KEY=VALUE ...]

For each T it rebuilds the run's recipe with `backbone.num_steps = T` and `backbone.init_from = RUN_DIR` (the same
schedule kind at T steps: FastDPM, strided, Karras), evaluates NUM_SAMPLES samples (default 600) with the recipe's
evaluator on one thread and prints the main metrics and the time taken. Nothing is written.
"""

from __future__ import annotations

import sys
import time
import tomllib

import torch

from rewardtune.api import build_trainer, make_recipe

KEYS = ("frechet_distance", "diversity", "accuracy", "reward_mean", "held_out/accuracy", "class_accuracy")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    run, steps = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
    num_samples = int(sys.argv[3]) if len(sys.argv) > 3 and not sys.argv[3].startswith("--") else 600
    overrides = [a for a in sys.argv[3:] if a != "--set" and "=" in a]
    with open(f"{run}/recipe.toml", "rb") as f:
        raw = tomllib.load(f)
    torch.set_num_threads(1)
    for num_steps in steps:
        start = time.time()
        tables = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
        tables["backbone"] = {**tables["backbone"], "num_steps": num_steps, "init_from": run}
        tables["eval"] = {**tables.get("eval", {}), "num_samples": num_samples}
        tables["train"] = {**tables.get("train", {}), "cpu_threads": 1}
        metrics = build_trainer(make_recipe(tables, overrides)).evaluate()
        shown = {k: round(metrics[k], 3) for k in KEYS if k in metrics}
        print(f"T = {num_steps}: {shown} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
