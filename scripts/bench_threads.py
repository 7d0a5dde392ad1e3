"""ms per training iteration of a recipe at several CPU thread counts, interleaved in one process (the evidence behind
a recipe's `train.cpu_threads`; issue W2 8/8).

    python scripts/bench_threads.py [RECIPE] [--threads 1,2] [--steps 300] [--warmup 20] [--alternations 6]
        [--set table.key=value ...] [--json PATH]

One trainer (built as `rewardtune bench` builds it: random weights, past the value warm-up) runs `--steps`
iterations at each thread count in turn (`torch.set_num_threads`), `--alternations` rounds: on a noisy machine only
neighbouring blocks compare. Prints each block, the median ms/iteration per thread count and the median ratio of each
count to the first.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from bench_overhead import interleaved_parser

from rewardtune.api import make_accelerator, make_trainer
from rewardtune.bench import step, without_init_from
from rewardtune.build import build_experiment
from rewardtune.recipe import load_recipe


def thread_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--threads: a comma-separated list of counts >= 1, got {text!r}")
    return counts


def main() -> None:
    args = interleaved_parser(__doc__.split("\n\n")[0], "1,2").parse_args()  # (scripts/ is on sys.path)
    counts = thread_counts(args.threads)
    trainer = make_trainer(build_experiment(without_init_from(load_recipe(args.recipe, args.overrides))), None, None,
                           make_accelerator())
    if hasattr(trainer.algorithm, "iteration"):
        trainer.algorithm.iteration = 10**9  # past any warm-up: every iteration is a full one
    blocks: dict[int, list[float]] = {n: [] for n in counts}
    for n in counts:
        torch.set_num_threads(n)
        for _ in range(args.warmup):
            step(trainer)
    for i in range(args.alternations):
        for n in counts:
            torch.set_num_threads(n)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(trainer)
            blocks[n].append(1000 * (time.perf_counter() - start) / args.steps)
        print(f"round {i + 1}: " + ", ".join(f"{n} thread(s) {blocks[n][-1]:.2f} ms" for n in counts), flush=True)
    first = counts[0]
    summary = {
        "recipe": args.recipe, "overrides": args.overrides, "steps": args.steps, "torch": torch.__version__,
        "ms_per_iteration": blocks,
        "median_ms": {n: statistics.median(v) for n, v in blocks.items()},
        "median_ratio_to_first": {n: statistics.median(a / b for a, b in zip(blocks[n], blocks[first]))
                                  for n in counts},
    }
    print("median ms/iteration: " + ", ".join(f"{n} thread(s) {summary['median_ms'][n]:.2f}" for n in counts)
          + "; ratio to " + f"{first} thread(s): "
          + ", ".join(f"{n}: {summary['median_ratio_to_first'][n]:.3f}" for n in counts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
