"""`rewardtune bench RECIPE`: the milliseconds of a recipe's training iteration by phase, the samples per second of
its sampler, and the peak memory; no run directory, no pretraining, no evaluation.

The trainer runs `warmup` iterations, then `steps` timed ones (as its loop runs them: the lr schedule advances, and
the iterations `log_every` names compute their gradient norms), each timed by phase with a `phases.PhaseClock`
(`Trainer.time_phases`; on a GPU every phase boundary synchronises, so the phases are the device's time too):

- rollout: `backbone.sample` of the batch (no gradients);
- reward_update: a learning reward's step (DxMI's energy);
- value_update: DxDP's policy evaluation (terminal regression and TD steps);
- policy_step: DxDP's policy improvement;
- algorithm_update: the rest of the algorithm's update (DxDP: AVR and its metrics; an algorithm that does not time
  its parts: all of its update);
- bookkeeping: the rest of the iteration (learning rates, the data batch, reading the metrics, the finiteness check,
  the EMA).

The phases add up to the iteration's wall time, measured around it; `total` is that time. The backbone starts from
random weights (`backbone.init_from` is not loaded: for most recipes the same work), unless `trained_weights` keeps
`init_from` (a finished run's folder): a reward whose cost depends on the images needs it (the shapes verifier
scores uniform noise about 5x slower than renders). An algorithm that counts iterations (DxDP's `value_warmup`,
distillation's regression phase) is put past them, so that every timed iteration is a full one.
"""

from __future__ import annotations

import dataclasses
import platform
import resource
from pathlib import Path

import torch

from rewardtune.errors import RecipeError
from rewardtune.phases import NO_PHASES, PhaseClock
from rewardtune.recipe import Recipe

PHASES = ("rollout", "reward_update", "value_update", "policy_step", "algorithm_update", "bookkeeping")


def without_init_from(recipe: Recipe) -> Recipe:
    """`recipe` without `backbone.init_from` (a benchmark times random weights, which cost the same)."""
    spec = recipe.plugins["backbone"]
    extra = {k: v for k, v in spec.extra.items() if k != "init_from"}
    plugins = {**recipe.plugins, "backbone": dataclasses.replace(spec, extra=extra)}
    return dataclasses.replace(recipe, plugins=plugins)


def benchmark(
    recipe: Recipe, *, steps: int, warmup: int, samples: int, profile: Path | None = None, trained_weights: bool = False
) -> dict:
    """Time `steps` iterations of `recipe` after `warmup` ones, and the drawing of `samples` samples; returns the
    JSON-ready result (`print_table` shows it). With `profile`, a few more iterations run under torch's profiler,
    with a scope per phase, and its Chrome trace is written there (the timings above are taken without it).

    `trained_weights`: load `backbone.init_from` as a run does instead of timing random weights; it must then name a
    finished run's folder (a `RecipeError` if it names a recipe, which would have to be run first, or is unset)."""
    from rewardtune.api import make_accelerator, make_trainer
    from rewardtune.build import build_experiment

    if steps < 1 or warmup < 0 or samples < 0:
        raise ValueError(f"steps >= 1, warmup >= 0 and samples >= 0 are needed, got {steps}, {warmup}, {samples}")
    if trained_weights and not recipe.plugins["backbone"].extra.get("init_from"):
        raise RecipeError("--trained-weights loads backbone.init_from, and this recipe sets none (add --set "
                          "backbone.init_from=RUN)")
    experiment = build_experiment(recipe if trained_weights else without_init_from(recipe))
    trainer = make_trainer(experiment, None, None, make_accelerator())
    if trainer.conditions is not None:  # a run's first iterations embed its prompts; not what an iteration costs
        trainer.conditions.embed_training_prompts()
    if hasattr(trainer.algorithm, "iteration"):
        trainer.algorithm.iteration = 10**9  # past any warm-up or first phase: every timed iteration is a full one
    cuda = trainer.device.type == "cuda"
    synchronize = torch.cuda.synchronize if cuda else None
    for _ in range(warmup):
        step(trainer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    clock = PhaseClock(synchronize)
    trainer.time_phases(clock)
    total = 0.0
    for _ in range(steps):
        start = clock.now()
        step(trainer)
        total += clock.now() - start
    phases = {name: 1000 * clock.seconds.get(name, 0.0) / steps for name in PHASES}
    result = {
        "recipe": str(recipe.path) if recipe.path is not None else None,
        "device": describe_device(trainer.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_steps": trainer.backbone.num_steps,
        "batch_size": trainer.config.batch_size,
        "steps": steps,
        "warmup": warmup,
        "weights": "backbone.init_from" if trained_weights else "random",
        "ms_per_iteration": {**phases, "total": 1000 * total / steps},
        "iterations_per_s": steps / total,
        "sampling": time_sampling(trainer, samples, clock),
        "peak_memory": peak_memory(cuda),
    }
    if profile is not None:
        trace_phases(trainer, profile, steps=min(steps, 5), synchronize=synchronize)
        result["profile"] = str(profile)
    trainer.time_phases(NO_PHASES)
    return result


def step(trainer) -> None:
    """One iteration as the training loop runs it (without logging, evaluation or checkpoints)."""
    trainer.train_step()
    trainer.step += 1


def time_sampling(trainer, samples: int, clock: PhaseClock) -> dict:
    """`backbone.sample` of `samples` chains (no gradients, eval mode, the run's autocast) in the evaluator's sampling
    batches (its `sample_batch`, else 500), after one warm-up batch: samples per second."""
    batch = min(int(getattr(trainer.evaluator, "sample_batch", 500)), max(samples, 1))
    if samples == 0:
        return {"samples": 0, "batch": None, "samples_per_s": None}
    generator = torch.Generator(device=trainer.device).manual_seed(0)
    backbone = trainer.backbone
    with torch.no_grad(), trainer.autocast():
        backbone.eval()
        backbone.sample(batch, generator)
        start = clock.now()
        for first in range(0, samples, batch):
            backbone.sample(min(batch, samples - first), generator)
        elapsed = clock.now() - start
    return {"samples": samples, "batch": batch, "samples_per_s": samples / elapsed}


def peak_memory(cuda: bool) -> dict:
    """The process's peak resident set size since it started (`getrusage`: building the experiment included), and on
    a GPU the peak memory torch allocated during the timed iterations and sampling."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if platform.system() == "Darwin" else rss * 1024  # bytes on macOS, KiB on Linux
    return {"rss_bytes": rss_bytes, "cuda_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def trace_phases(trainer, path: Path, *, steps: int, synchronize) -> None:
    """Run `steps` more iterations under torch's profiler, a `record_function` scope per phase, and write its Chrome
    trace to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    trainer.time_phases(PhaseClock(synchronize, profile=True))
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step(trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(path))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def print_rows(result: dict) -> list[tuple[str, str]]:
    """The table `rewardtune bench` prints: (what, value) rows."""
    ms = result["ms_per_iteration"]
    total = ms["total"]
    rows = [(name, f"{ms[name]:8.3f} ms  {100 * ms[name] / total:5.1f}%") for name in PHASES]
    rows.append(("total", f"{total:8.3f} ms  ({result['iterations_per_s']:.1f} iterations/s)"))
    sampling = result["sampling"]
    if sampling["samples_per_s"] is not None:
        rate = f"{sampling['samples_per_s']:.0f} samples/s ({sampling['samples']} in batches of {sampling['batch']})"
        rows.append(("sampling", rate))
    memory = result["peak_memory"]
    rows.append(("peak RSS", f"{memory['rss_bytes'] / 2**20:.0f} MiB (process)"))
    if memory["cuda_allocated_bytes"] is not None:
        rows.append(("peak GPU memory", f"{memory['cuda_allocated_bytes'] / 2**20:.0f} MiB allocated"))
    return rows

