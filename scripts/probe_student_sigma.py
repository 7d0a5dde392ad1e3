"""How much of a one-step student's Fréchet distance is its own noise sigma_s z?

Usage: python scripts/probe_student_sigma.py RUN [--step N] [--scales 1 0.5 0.25 0.01]
Evaluates the run's evaluated student (its EMA when it keeps one) with sigma_s multiplied by each scale, everything
else as `rewardtune eval` does it (same seed, same samples, same metrics), and prints one line per scale. A student
regressed on a deterministic teacher path gets sigma_s = the residual std of its fit, which is approximation error
and not noise the teacher adds; this shows what spending it as iid noise on every sample costs.
"""

import argparse

from rewardtune.algorithms.distill import set_sigma
from rewardtune.api import load_run

parser = argparse.ArgumentParser()
parser.add_argument("run")
parser.add_argument("--step", type=int, default=None)
parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.01])
args = parser.parse_args()

trainer = load_run(args.run, step=args.step)
student = trainer.evaluated_backbone()
own_sigma = float(student.sigma()[0])
for scale in args.scales:
    set_sigma(student, own_sigma * scale)
    metrics = trainer.evaluate()
    sigma = float(student.sigma()[0])
    print(
        f"sigma_s x {scale:<5g} = {sigma:.4f}   FD {metrics['frechet_distance']:6.2f}  "
        f"precision {metrics['precision']:.3f}  recall {metrics['recall']:.3f}",
        flush=True,
    )
