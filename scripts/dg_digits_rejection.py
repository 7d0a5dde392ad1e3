"""Rejection sampling of the frozen digits sampler by a discriminator-guidance run's density ratio (issue W2 6/8):
Fréchet distance, precision and recall of the kept samples on the run's own evaluator (its `digits` features and
reference), beside the unguided and guided samplers' figures from `rewardtune eval`.

    python scripts/dg_digits_rejection.py RUN [RUN ...] [--budgets 2 4] [--n 2000] [--seed 0] [--no-drs]

For each run (a `dg_digits.toml` run directory): n proposals of the frozen T = 4 sampler, unguided (the run's
sampler as it is), scored by the run's evaluator; then n samples kept by DRS (gamma = 0) and by optimal budgeted
rejection at each budget K (`api.sample_by_rejection`: the discriminator at the clean level, calibrated on 2,000
proposals), each scored the same way. DRS stops after 100 n proposals (`api.sample_by_rejection`): a ratio whose
calibration maximum is far above most proposals' keeps too few, and the row says so. Rows print as they finish.
"""

from __future__ import annotations

import argparse

import torch

import rewardtune as rt
from rewardtune import api
from rewardtune.errors import RewardtuneError
from rewardtune.image_evaluation import PR_MAX_FEATURES
from rewardtune.metrics.fid import frechet_distance
from rewardtune.metrics.precision_recall import precision_recall


def scores(trainer, samples: torch.Tensor) -> tuple[float, float, float]:
    """(FD, precision, recall) of image samples [n, 1, 8, 8] against the run's reference features."""
    evaluator = trainer.evaluator
    fake = evaluator.features(samples)
    precision, recall = precision_recall(evaluator.precision_recall_reference(), fake[:PR_MAX_FEATURES])
    return frechet_distance(evaluator.reference(), fake), precision, recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-drs", dest="drs", action="store_false", help="budgeted rules only")
    args = parser.parse_args()
    print("| run | sampler | Fréchet distance | precision | recall |")
    print("|---|---|---|---|---|", flush=True)
    for run in args.runs:
        trainer = rt.load_run(run)
        rules = [("unguided", lambda t: api.sample_trainer(t, args.n, seed=args.seed)[0])]
        if args.drs:
            rules.append(("DRS", lambda t: api.sample_by_rejection(t, args.n, "drs", 1.0, seed=args.seed)))
        rules += [(f"OBRS K = {k:g}", lambda t, k=k: api.sample_by_rejection(t, args.n, "budgeted", k, seed=args.seed))
                  for k in args.budgets]
        for name, draw in rules:
            try:
                samples = draw(trainer)
            except RewardtuneError as err:
                print(f"| {run} | {name} | ({err}) | | |", flush=True)
                continue
            fd, precision, recall = scores(trainer, samples)
            print(f"| {run} | {name} | {fd:.2f} | {precision:.3f} | {recall:.3f} |", flush=True)


if __name__ == "__main__":
    main()
