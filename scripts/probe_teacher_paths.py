"""How good is a teacher's sampler when its noise is switched off, or replaced by a fixed function of x_0?

Usage: python scripts/probe_teacher_paths.py STUDENT_OR_IMAGE_RUN TEACHER_RUN [--n 2000]
The first run supplies the evaluator (its data and feature extractor); the second is the T-step teacher. Prints the
Fréchet distance, precision and recall of 2,000 samples for: the teacher with independent noise; its noiseless
mean path (what `distill` regresses on by default); noise z_t = R_t x_0 for fixed random rotations R_t (a deterministic
map of x_0 that keeps each z_t standard normal); and that noise in the first step only. A deterministic map is what
a one-step student can fit by regression, so these bound what regression alone can reach.
"""

import argparse
from pathlib import Path

import torch

from rewardtune.api import load_run
from rewardtune.build import load_teacher
from rewardtune.metrics.fid import frechet_distance
from rewardtune.metrics.precision_recall import precision_recall

parser = argparse.ArgumentParser()
parser.add_argument("run")
parser.add_argument("teacher")
parser.add_argument("--n", type=int, default=2000)
args = parser.parse_args()

evaluator = load_run(Path(args.run)).evaluator
teacher = load_teacher(Path(args.teacher)).backbone
gen = torch.Generator().manual_seed(0)
x0 = torch.randn(args.n, *teacher.sample_shape, generator=gen)
reference = evaluator.reference()
dim = x0[0].numel()
rotations = [torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(100 + t)))[0] for t in range(teacher.num_steps)]


@torch.no_grad()
def run_chain(noise_at) -> torch.Tensor:
    """The teacher's chain from x0 with the noise of step t given by noise_at(t)."""
    x = x0
    for t in range(teacher.num_steps):
        x = teacher.step(x, teacher.times(t, x.shape[0]), noise_at(t))
    return x.clamp(-1, 1)


def report(name: str, samples: torch.Tensor) -> None:
    features = evaluator.features(samples)
    precision, recall = precision_recall(reference, features)
    print(f"{name:42s} FD {frechet_distance(reference, features):6.2f}  precision {precision:.3f}  recall {recall:.3f}")


def rotated(t: int) -> torch.Tensor:
    return (x0.flatten(1) @ rotations[t].T).view_as(x0)


report("independent noise (the teacher)", run_chain(lambda t: torch.randn(x0.shape, generator=gen)))
with torch.no_grad():
    report("noiseless mean path", teacher.mean_path(x0).clamp(-1, 1))
report("z_t = R_t x_0", run_chain(rotated))
report("z_0 = R_0 x_0, no noise afterwards", run_chain(lambda t: rotated(t) if t == 0 else torch.zeros_like(x0)))
