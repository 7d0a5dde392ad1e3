"""Training-iteration throughput and peak memory of a recipe (CPU or GPU), without pretraining or evaluation.
(`rewardtune bench RECIPE` measures the same, split by phase, with JSON output; this script stays for the figures
docs/results.md quotes from it.)

Usage: python scripts/bench_iteration.py RECIPE [--iters N] [--warmup N] [--sample N] [--set table.key=value ...]
Prints seconds per iteration, iterations per second and peak memory (GPU: torch.cuda.max_memory_allocated; CPU:
the process's peak resident set size). `backbone.init_from` is ignored (random or pretrained weights run alike).
With --sample N it also times drawing N samples (the T-step chain without gradients, in the evaluator's
sampling batches, 500 by default), what evaluation and `rewardtune sample` spend.
"""

import argparse
import resource
import time

import torch

from rewardtune.api import make_accelerator, make_trainer
from rewardtune.build import build_experiment
from rewardtune.recipe import load_recipe

parser = argparse.ArgumentParser()
parser.add_argument("recipe")
parser.add_argument("--iters", type=int, default=50)
parser.add_argument("--warmup", type=int, default=5)
parser.add_argument("--sample", type=int, default=0, help="also time drawing this many samples")
parser.add_argument("--set", dest="overrides", action="append", default=[])
args = parser.parse_args()

recipe = load_recipe(args.recipe, args.overrides)
recipe.plugins["backbone"].extra.pop("init_from", None)
trainer = make_trainer(build_experiment(recipe), None, None, make_accelerator())
trainer.algorithm.iteration = 10**9  # past any value warm-up: every timed iteration includes policy improvement
cuda = trainer.device.type == "cuda"


def sync():
    if cuda:
        torch.cuda.synchronize()


for _ in range(args.warmup):
    trainer.train_step()
sync()
if cuda:
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
for _ in range(args.iters):
    trainer.train_step()
sync()
elapsed = (time.perf_counter() - start) / args.iters
print(f"device: {trainer.device} ({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} CPU threads'})")
print(f"batch per process: {recipe.train.batch_size}, T = {trainer.backbone.num_steps}")
print(f"{elapsed * 1000:.1f} ms/iteration, {1 / elapsed:.2f} iterations/s")
if cuda:
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
print(f"peak process RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

if args.sample:
    batch = getattr(trainer.evaluator, "sample_batch", 500)
    with torch.no_grad():
        trainer.backbone.sample(min(batch, args.sample))  # warm-up
        sync()
        start = time.perf_counter()
        for i in range(0, args.sample, batch):
            trainer.backbone.sample(min(batch, args.sample - i))
        sync()
    elapsed = time.perf_counter() - start
    print(f"sampling: {args.sample} samples in {elapsed:.2f} s ({args.sample / elapsed:.0f} samples/s, batch {batch})")
