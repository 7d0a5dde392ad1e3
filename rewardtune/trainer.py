"""The Trainer: the one training loop of rewardtune, for every algorithm, on one process or many (accelerate).

One iteration: data batch -> `backbone.sample(B)` (no grad) -> learning reward `update(real, x_T)` (the EBM step of
Algorithm 1, line 4) -> `algorithm.update(real, trajectory)` (value, policy improvement, AVR) -> EMA -> log / eval /
checkpoint. The trainer is the only code that knows about devices, processes, checkpoints and progress reporting.

Conditional runs (`conditions`, a `ConditionSupply`): the data batch comes with its own conditions, the rollouts are
drawn under conditions from the supply (`Trajectory.condition`), a learning reward is updated on both with their
conditions, the algorithm gets the data's conditions as `real_condition`, and the evaluator gets the supply.

Modes: the trainer sets the backbone's train/eval mode before each phase. Rollouts and evaluation run it in eval
mode; `algorithm.update` runs it in the mode the algorithm declares (`backbone_mode`); between phases it rests in
eval mode. Evaluation puts every module it uses in eval mode and restores each submodule's mode afterwards.

Several processes: every decision the ranks branch on is agreed, and an error on one rank is raised on every rank
(`agreement.py`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.distributed as dist

from rewardtune import agreement, compiling
from rewardtune import checkpoint as ckpt
from rewardtune.agreement import Point
from rewardtune.cpu_threads import cpu_thread_count, local_process_count
from rewardtune.errors import (
    CheckpointError,
    Interrupted,
    NonFiniteError,
    PluginError,
    RecipeError,
)
from rewardtune.evaluation import round_metrics
from rewardtune.memory_format import to_channels_last
from rewardtune.modes import eval_mode
from rewardtune.phases import NO_PHASES, Phases
from rewardtune.plugin_failures import PluginOwners
from rewardtune.precision import autocast
from rewardtune.sharding import (
    ShardingPlan,
    is_sharded,
    shard_backbone,
    sharding_plan,
    swap_parameters,
)


@dataclass(frozen=True)
class TrainConfig:
    """The [train] section of a recipe."""

    steps: int = 1000  # training iterations (0: only evaluate the starting model)
    batch_size: int = 128  # samples per process per iteration (the global batch is this times the process count)
    seed: int = 0  # the one seed every random stream is derived from
    log_every: int = 50  # write a metrics.jsonl line every this many iterations
    eval_every: int = 0  # evaluate (and plot) every this many iterations (0: only at the start and the end)
    checkpoint_every: int = 1000  # write a checkpoint every this many iterations (and always at the end)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    ema_decay: float = 0.0  # EMA of the sampler's weights used for evaluation (0: evaluate the raw weights)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # learning-rate multiplier over training
    lr_final_fraction: float = 0.0  # cosine schedule: final multiplier
    cpu_threads: int | Literal["auto"] = "auto"  # torch intra-op threads per process on a CPU: a count, 0 (torch's
    # default: every core) or "auto" (cpu_threads.cpu_thread_count: 1 for small networks, else at most 4)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast of the networks' forward passes in rollouts,
    # updates and evaluation; log-probs, sigma_t, values and TD targets stay fp32; fp16 scales every loss
    skip_nonfinite: bool = False  # skip (and count, `skipped_steps`) an optimiser step whose gradients are NaN/inf;
    # without it such a step stops the run with NonFiniteError (the last checkpoint is kept)
    compile: bool = False  # torch.compile the networks (compiling.py); a compilation failure falls back to eager
    # with a one-line note
    channels_last: bool = False  # convolution weights in channels-last order (memory_format.py), for GPU UNets


@dataclass(frozen=True)
class EvalConfig:
    """The [eval] section of a recipe."""

    num_samples: int = 10000  # samples per evaluation
    repeats: int = 5  # independent samplings averaged per evaluation
    guidance_scale: float = 0.0  # value guidance lambda at evaluation (needs a value function)
    plot: bool = True  # write a picture of the samples at every evaluation
    feature_extractor: str = "inception"  # images: FID features ('inception', 'digits', "package.module:factory")
    reference_samples: int = 0  # images: data images for the reference statistics (0: all)
    keep_best: str = ""  # a metric name: keep the checkpoint with its best periodic value in checkpoints/best
    best_mode: Literal["min", "max"] = "min"  # whether lower or higher `keep_best` is better


class Reporter(Protocol):
    """Receives progress; the CLI implements it with a rich progress bar. Library code never prints."""

    def start(self, total: int, done: int, description: str) -> None: ...
    def advance(self, step: int, metrics: dict[str, float]) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


class SilentReporter:
    def start(self, total: int, done: int, description: str) -> None:
        pass

    def advance(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def stop(self) -> None:
        pass


class EMA:
    """Exponential moving average of a module's parameters, with the usual (1 + n) / (10 + n) warm-up.

    Only the trainable parameters are averaged copies: the frozen ones (a base UNet under LoRA, a VAE, a text
    encoder) and the buffers are the live module's own tensors, shared, so an EMA of a LoRA backbone costs the size of
    its adapters, not a second copy of the model."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        shared = [*(p for p in module.parameters() if not p.requires_grad), *module.buffers()]
        self.module = copy.deepcopy(module, memo={id(t): t for t in shared}).requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        pairs = [(p_ema, p) for p_ema, p in zip(self.module.parameters(), module.parameters())
                 if p_ema is not p and p.requires_grad]  # frozen ones are shared (or, under FSDP, equal copies)
        plain = [(p_ema, p) for p_ema, p in pairs if not is_sharded(p)]
        if plain:  # one multi-tensor lerp (what p_ema.lerp_(p, 1 - decay) does per parameter)
            torch._foreach_lerp_([e for e, _ in plain], [p for _, p in plain], 1 - decay)
        for p_ema, p in pairs:
            if is_sharded(p):
                p_ema.lerp_(p, 1 - decay)


def lr_multiplier(schedule: str, step: int, total: int, final_fraction: float) -> float:
    if schedule == "constant" or total <= 0:
        return 1.0
    progress = min(step / total, 1.0)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Trains `backbone` with `algorithm` (and a learning `reward`) and evaluates it.

    Args:
        backbone: the policy.
        algorithm: has `update(real, trajectory, generator)`, `needs_rollout` (read every iteration: false means no
            rollout and no learning-reward update that iteration, and `trajectory` is None), `modules()`,
            `optimizers()`, `state_dict()`/`load_state_dict()`, and optionally `guide(scale)`,
            `lr_schedule_window(step, total) -> (start, end)`, the iterations over which `lr_schedule` runs at `step`
            (default: the whole run; `distill` can restart it when its second phase begins), and `backbone_mode`,
            "train" or "eval" (default), the mode `update` runs the backbone in.
        reward: the reward (None for pure pretraining); a learning reward is updated every iteration.
        data: `sample(n, generator) -> Tensor`.
        evaluator: `evaluate(backbone, reward, generator, guide) -> metrics` and `plot(...)`.
        config, eval_config: the [train] and [eval] sections.
        out_dir: the run directory (None: keep nothing on disk).
        reporter: progress sink.
        plugin_owners: which packages are plugin code, to name a plugin that fails in training or evaluation
            (`build_experiment` makes them from the recipe; default: the classes of the objects given here).
        accelerator: an `accelerate.Accelerator` (created here when None).
        conditions: a conditional run's `condition_supply.ConditionSupply` (None: unconditional).
    """

    def __init__(
        self,
        *,
        backbone,
        algorithm,
        reward,
        data,
        evaluator,
        config: TrainConfig,
        eval_config: EvalConfig | None = None,
        out_dir: Path | None = None,
        reporter: Reporter | None = None,
        accelerator=None,
        plugin_owners: PluginOwners | None = None,
        conditions=None,
    ) -> None:
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=not torch.cuda.is_available())
        check_distributed_type(accelerator)
        check_launch_precision(accelerator, config.mixed_precision)
        self.accelerator = accelerator
        self.backbone, self.algorithm, self.reward = backbone, algorithm, reward
        self.data, self.evaluator = data, evaluator
        self.conditions = conditions
        self.phases: Phases = NO_PHASES  # times nothing unless a benchmark asks (`time_phases`)
        self.config, self.eval_config = config, eval_config or EvalConfig()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.reporter = reporter or SilentReporter()
        self.plugin_owners = plugin_owners or PluginOwners.of_objects(  # names a plugin whose own code fails
            {"backbone": backbone, "algorithm": algorithm, "reward": reward, "data": data, **algorithm.modules()}
        )
        self.device = accelerator.device
        self.rank = accelerator.process_index
        threads = cpu_thread_count(config.cpu_threads, backbone, local_process_count(accelerator))
        if threads > 0 and self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.backbone_training = update_mode_is_train(algorithm)
        with agreement.together(Point.INIT, self.device):  # e.g. out of memory on one rank: every rank stops
            for module in self.modules().values():
                module.to(self.device)
        broadcast_modules(self.modules())
        backbone.eval()  # at rest between phases (see the module docstring); EMA below copies the mode
        if config.channels_last:  # before the EMA copy, which then keeps the order too
            to_channels_last(list(self.modules().values()))
        self.ema = EMA(backbone, config.ema_decay) if config.ema_decay > 0 else None
        self.sharded = self.shard(sharding_plan(accelerator))
        self.compiled = compiling.networks(self.modules()) if config.compile else []
        compiling.compile_networks(self.compiled)
        for opt in self.optimizers().values():  # fp16 loss scaling and the non-finite policy are the run's
            opt.configure(loss_scaling=config.mixed_precision == "fp16", skip_nonfinite=config.skip_nonfinite,
                          device_type=self.device.type)
        self.skipped_steps = 0  # steps skipped for non-finite gradients before this trainer (from the checkpoint)
        self.step = 0
        self.initial_metrics: dict[str, float] | None = None
        self.best: dict | None = None  # {"step", "metric", "value"} of the checkpoint kept in checkpoints/best
        self.saved_step: int | None = None  # the step of the last checkpoint written by this trainer
        self.stop_signal: int | None = None  # set by SIGINT/SIGTERM (or `request_stop`): checkpoint and stop
        self.time_offset = 0.0  # training seconds before this process (restored on resume)
        self.clock_start: float | None = None  # perf_counter() when this process's training loop began
        # Per-rank streams: data draws on the CPU, rollouts and noise on the accelerator's device.
        self.data_gen = torch.Generator().manual_seed(config.seed * 1000 + self.rank + 1)
        self.train_gen = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + self.rank + 500)

    def shard(self, plan: ShardingPlan | None) -> bool:
        """Shard the backbone's network (and the EMA's) under FSDP2 when the launch asked for FSDP with more than one
        process (`sharding.py`), and point the optimisers at the sharded parameters. Returns whether it sharded."""
        if plan is None:
            return False
        if self.accelerator.num_processes < 2:
            self.reporter.message("note: FSDP with one process has nothing to shard; the run trains unsharded")
            return False
        with agreement.together(Point.INIT, self.device):
            also = [self.ema.module] if self.ema is not None else []
            mapping = shard_backbone(self.backbone, plan, self.device, also=also)
            for opt in self.optimizers().values():
                swap_parameters(opt.optimizer, mapping)
        return True

    # ---- what is saved -------------------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        modules = {"backbone": self.backbone, **self.algorithm.modules()}
        if self.reward is not None:
            modules["reward"] = self.reward
        if getattr(self, "ema", None) is not None:
            modules["ema"] = self.ema.module
        return modules

    def optimizers(self) -> dict:
        opts = dict(self.algorithm.optimizers())
        for i, opt in enumerate(self.reward.optimizers() if self.reward is not None else []):
            if all(opt is not o for o in opts.values()):
                opts[f"reward{i}"] = opt
        return opts

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path | None:
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    def save(self) -> None:
        """Every rank takes part (its RNG state); the main process commits. A status exchange after each part keeps
        the ranks in step, and a failure there (a full disk on one rank) stops every rank with the same error."""
        root = self.checkpoint_root
        if root is None:
            return
        with agreement.together(Point.CHECKPOINT_RNG, self.device):
            ckpt.write_rng(root, self.step, self.rank, {"data": self.data_gen.get_state(), "train": self.train_gen.get_state()})
        with agreement.together(Point.CHECKPOINT_GATHER, self.device):  # sharded tensors: every rank gathers them
            contents = self.checkpoint_contents() if self.sharded else None
        with agreement.together(Point.CHECKPOINT_COMMIT, self.device):
            if self.is_main:
                self.commit(contents)
        self.saved_step = self.step

    def commit(self, contents: tuple[dict, dict] | None = None) -> None:
        """The main process's part of `save`: weights, optimisers and trainer state of this step (`contents`, when
        every rank has gathered them already)."""
        weights, state = contents if contents is not None else self.checkpoint_contents()
        ckpt.commit_checkpoint(self.checkpoint_root, self.step, weights, state, keep=self.config.keep_checkpoints)

    def checkpoint_contents(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(weights, state) of this step as the checkpoint holds them: full tensors, whatever the sharding."""
        state = {
            "step": self.step,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
            "algorithm": self.algorithm.state_dict(),
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "initial_metrics": json.dumps(self.initial_metrics),
            "best": json.dumps(self.best),
            "world_size": self.accelerator.num_processes,
            "elapsed_s": self.elapsed(),
            "skipped_steps": self.total_skipped_steps(),
        }
        return ckpt.flatten_modules(self.modules()), state

    def load(self, path: Path) -> None:
        weights, state, rng = ckpt.read_checkpoint(path, self.rank)
        ckpt.load_modules(self.modules(), weights)
        try:
            for name, opt in self.optimizers().items():
                opt.load_state_dict(state["optimizers"][name])
            self.algorithm.load_state_dict(state["algorithm"])
        except (KeyError, ValueError, RuntimeError) as err:  # the recipe changed its optimisers or its algorithm
            raise CheckpointError(
                f"{path} does not fit this recipe's optimisers or algorithm ({type(err).__name__}: {err}); resume with "
                "the recipe that wrote it, or start afresh with --force and no --resume"
            ) from None
        self.time_offset = float(state.get("elapsed_s", 0.0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        for opt in self.optimizers().values():
            opt.skipped = 0
        if self.ema is not None:
            self.ema.updates = int(state["ema_updates"])
        self.step = int(state["step"])
        self.initial_metrics = json.loads(state["initial_metrics"])
        self.best = json.loads(state.get("best", "null"))
        if rng is not None and int(state.get("world_size", 1)) == self.accelerator.num_processes:
            self.data_gen.set_state(rng["data"])
            self.train_gen.set_state(rng["train"])

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def evaluated_backbone(self, raw: bool = False):
        """The policy that evaluation and sampling use: the EMA weights when the run keeps an EMA, unless `raw` asks
        for the trained weights themselves."""
        return self.ema.module if self.ema is not None and not raw else self.backbone

    def autocast(self):
        """The [train] mixed_precision autocast for the networks' forward passes (a no-op context for "no")."""
        return autocast(self.device.type, self.config.mixed_precision)

    def total_skipped_steps(self) -> int:
        """Optimiser steps skipped for non-finite gradients over the whole run (`skip_nonfinite`)."""
        return self.skipped_steps + sum(opt.skipped for opt in self.optimizers().values())

    def fall_back_from_compile(self, err: BaseException) -> bool:
        """`train.compile`'s fallback: when `err` is a torch.compile failure of this run's compiled networks, turn
        compilation off for all of them, say so in one line and return True (the caller runs its step again);
        otherwise False."""
        if not (self.compiled and compiling.is_compile_failure(err)):
            return False
        self.reporter.message(f"note: train.compile: torch.compile failed ({compiling.failure_line(err)}); "
                              "training goes on uncompiled")
        compiling.uncompile(self.compiled)
        self.compiled = []
        return True

    def evaluate(self, plot_name: str | None = None, *, raw: bool = False) -> dict[str, float]:
        """Metrics of `evaluated_backbone(raw)`, with every module evaluation uses (backbone, reward, the algorithm's
        modules) in eval mode and each submodule's own mode restored afterwards, so the numbers do not depend on the
        modes the modules were left in.

        Every rank evaluates with the same seed, and every rank returns the main process's metrics (broadcast): ranks
        can differ (a rank-dependent reward, nondeterministic kernels), and eval.json, keep-best and the reports must
        not."""
        backbone = self.evaluated_backbone(raw)
        seed = self.config.seed + 10_000_019
        with agreement.together(Point.EVALUATION, self.device):
            with self.plugin_owners.attributing(f"in the evaluation at step {self.step}"), \
                    eval_mode(backbone, self.reward, *self.algorithm.modules().values()):
                guide = None
                if self.eval_config.guidance_scale:
                    guide = self.algorithm.guide(self.eval_config.guidance_scale)
                given = {} if self.conditions is None else {"conditions": self.conditions}
                with self.autocast():
                    try:
                        metrics = round_metrics(self.evaluator.evaluate(backbone, self.reward, seed, guide, **given))
                    except Exception as err:
                        if not self.fall_back_from_compile(err):
                            raise
                        metrics = round_metrics(self.evaluator.evaluate(backbone, self.reward, seed, guide, **given))
                if plot_name and self.eval_config.plot and self.out_dir is not None and (self.is_main or self.sharded):
                    with plot_path(self.out_dir / plot_name, keep=self.is_main) as path:  # sharded: every rank samples
                        self.evaluator.plot(backbone, self.reward, path, seed, title=f"step {self.step}", **given)
            metrics = agreement.broadcast_from_main(metrics, self.device)
        return metrics

    def write_eval(self, metrics: dict[str, float]) -> None:
        if self.is_main and self.out_dir is not None:
            ckpt.write_json_atomic(
                self.out_dir / "eval.json",
                {"step": self.step, "metrics": metrics, "initial_metrics": self.initial_metrics},
            )

    # ---- the loop ------------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        """Train to `config.steps` and return {"step", "metrics", "initial_metrics"} (also written to eval.json).

        With several processes every rank returns the same result, or raises the same error (`agreement.py`)."""
        with agreement.together(Point.FIT_END, self.device):
            if self.out_dir is not None and self.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                self.resume()
            if self.initial_metrics is None:
                self.start_fresh()
            done_at_start = self.step
            self.train_loop()
            final = self.finish(done_at_start)
        return {"step": self.step, "metrics": final, "initial_metrics": self.initial_metrics}

    def start_fresh(self) -> None:
        """A fresh run's step-0 evaluation, check of `eval.keep_best` and step-0 checkpoint."""
        if self.out_dir is not None and self.is_main:
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
        self.initial_metrics = self.evaluate(plot_name="samples_step0.png")
        self.reporter.message(f"initial: {format_metrics(self.initial_metrics)}")
        name = self.eval_config.keep_best
        if name and name not in self.initial_metrics:  # the main process's metrics, so every rank raises it
            raise agreement.agreed(
                RecipeError(f"eval.keep_best = {name!r} is not a metric of this run ({', '.join(self.initial_metrics)})")
            )
        self.save()

    def train_loop(self) -> None:
        """Iterations up to `config.steps`; a stop request checkpoints and raises `Interrupted`."""
        cfg = self.config
        self.reporter.start(cfg.steps, self.step, "training")
        log_file = self.out_dir / "metrics.jsonl" if self.out_dir is not None and self.is_main else None
        self.clock_start = time.perf_counter()
        previous_handlers = install_stop_handlers(self.request_stop)
        try:
            while self.step < cfg.steps:
                window = self.lr_schedule_window()
                if self.should_stop(window):
                    self.save()
                    code = 130 if self.stop_signal == signal.SIGINT else 143
                    raise agreement.agreed(
                        Interrupted(
                            f"stopped by {signal.Signals(self.stop_signal).name} at step {self.step}; a checkpoint was "
                            "written: rerun with --resume to continue",
                            code,
                        )
                    )
                metrics = self.train_step(window)
                self.step += 1
                self.after_step(metrics, log_file)
        finally:
            self.reporter.stop()
            restore_handlers(previous_handlers)

    def after_step(self, metrics: dict[str, float], log_file: Path | None) -> None:
        """Log, evaluate (then keep the best) and checkpoint, each when due."""
        cfg = self.config
        if log_file is not None and self.logs_step(self.step):
            record = {"step": self.step, "time_s": round(self.elapsed(), 3), **round_metrics(metrics)}
            with log_file.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        self.reporter.advance(self.step, metrics)
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
            result = self.evaluate(plot_name=f"samples_step{self.step}.png")
            self.log_eval(result, log_file, self.elapsed())
            self.keep_if_best(result)
        if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps and self.saved_step != self.step:
            self.save()

    def logs_step(self, step: int) -> bool:
        """Whether iteration `step` (counted from 1) writes a metrics.jsonl line: every `log_every`, and the last."""
        return step % self.config.log_every == 0 or step == self.config.steps

    def finish(self, done_at_start: int) -> dict[str, float]:
        """The final checkpoint (unless this step's exists, or a resumed finished run trained nothing), the final
        evaluation and eval.json; returns the final metrics."""
        finished_before = agreement.broadcast_from_main(  # the file system as the main process sees it
            self.is_main and self.out_dir is not None and (self.out_dir / "eval.json").exists(), self.device
        )
        if self.saved_step != self.step and (self.step > done_at_start or not finished_before):
            self.save()
        if self.step == 0:  # nothing trained: the starting evaluation is the final one
            final = dict(self.initial_metrics)
            if self.is_main and self.out_dir is not None and (self.out_dir / "samples_step0.png").exists():
                shutil.copyfile(self.out_dir / "samples_step0.png", self.out_dir / "samples.png")
        else:
            final = self.evaluate(plot_name="samples.png")
        self.write_eval(final)
        return final

    def elapsed(self) -> float:
        """Seconds of training so far, across resumes (metrics.jsonl's `time_s`)."""
        running = time.perf_counter() - self.clock_start if self.clock_start is not None else 0.0
        return self.time_offset + running

    def resume(self) -> Path | None:
        """Load the run directory's latest checkpoint (the one the main process finds), if there is one, on every
        rank; returns its path. A rank that cannot load it stops every rank with its error."""
        with agreement.together(Point.RESUME, self.device):
            root = self.checkpoint_root
            latest = ckpt.latest_checkpoint(root) if root is not None and self.is_main else None
            latest = agreement.broadcast_from_main(latest, self.device)
            if latest is not None:
                self.load(latest)
                self.reporter.message(f"resumed from {latest} (step {self.step})")
        return latest

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask the loop to checkpoint and stop after the current iteration (what SIGINT/SIGTERM do)."""
        self.stop_signal = signum

    def should_stop(self, window: tuple[int, int] | tuple[()] = ()) -> bool:
        """Whether any rank was asked to stop, agreed across ranks so that every rank checkpoints together.

        This is the iteration's status exchange (`agreement.exchange`): it also stops every rank when one failed,
        and checks that every rank is at the same step with the same lr-schedule `window`."""
        agreed = agreement.exchange(Point.ITERATION, self.device, stop=self.stop_signal or 0, values=(self.step, *window))
        # A signal handled while this rank waited in the exchange is not in `agreed`: keep it for the next iteration
        # instead of overwriting it, and decide from `agreed` alone, so that every rank agrees.
        if agreed:
            self.stop_signal = agreed
        return agreed != 0

    def lr_schedule_window(self) -> tuple[int, int]:
        """The iterations `train.lr_schedule` spans at this step: the algorithm's `lr_schedule_window`, else the run."""
        if hasattr(self.algorithm, "lr_schedule_window"):
            start, end = self.algorithm.lr_schedule_window(self.step, self.config.steps)
            return int(start), int(end)
        return 0, self.config.steps

    def keep_if_best(self, result: dict[str, float]) -> None:
        """Keep a copy of this step's checkpoint in checkpoints/best when `eval.keep_best` improved."""
        name = self.eval_config.keep_best
        if not name or self.checkpoint_root is None:
            return
        value = result[name]
        better = self.best is None or (value < self.best["value"] if self.eval_config.best_mode == "min" else value > self.best["value"])
        if not better:
            return
        self.best = {"step": self.step, "metric": name, "value": value}
        self.save()
        with agreement.together(Point.BEST, self.device):
            if self.is_main:
                ckpt.copy_as_best(self.checkpoint_root, self.step, self.best)

    def log_eval(self, result: dict[str, float], log_file: Path | None, elapsed: float) -> None:
        self.reporter.message(f"step {self.step}: {format_metrics(result)}")
        if log_file is not None:
            with log_file.open("a") as fh:
                fh.write(json.dumps({"step": self.step, "time_s": round(elapsed, 3), "eval": result}) + "\n")

    def real_batch(self, n: int):
        """A data batch [n, ...] and its conditions (None for an unconditional run or data without conditions)."""
        if self.conditions is None:
            return self.data.sample(n, self.data_gen, device=self.device), None
        return self.conditions.real_batch(self.data, n, self.data_gen, self.device)

    def rollout_conditions(self, n: int, real_condition):
        """The conditions of this iteration's n chains (None: unconditional), drawn from the data stream."""
        if self.conditions is None:
            return None
        group_size = int(getattr(self.algorithm, "rollout_group_size", 1))  # an algorithm that needs groups says so
        return self.conditions.rollout_conditions(n, self.data_gen, real_condition, self.device, group_size)

    def train_step(self, window: tuple[int, int] | None = None) -> dict[str, float]:
        """One iteration (see the module docstring) with the lr schedule over `window` (default: this step's
        `lr_schedule_window()`); returns the metrics of this rank. Timed by phase into `phases` (`time_phases`):
        what the named phases inside leave is "bookkeeping" (lr, data batch, metrics, finiteness, EMA)."""
        with self.phases.phase("bookkeeping"):
            return self.run_iteration(window)

    def time_phases(self, phases: Phases) -> None:
        """Time the iterations by phase into `phases` (a benchmark's `phases.PhaseClock`; `NO_PHASES`, the default,
        times nothing). An algorithm that times its own parts holds a `phases` attribute; it gets them too."""
        self.phases = phases
        if hasattr(self.algorithm, "phases"):
            self.algorithm.phases = phases

    def run_iteration(self, window: tuple[int, int] | None) -> dict[str, float]:
        """The body of `train_step`."""
        cfg = self.config
        start, end = window if window is not None else self.lr_schedule_window()
        scale = lr_multiplier(cfg.lr_schedule, self.step - start, end - start, cfg.lr_final_fraction)
        logged = self.logs_step(self.step + 1)  # diagnostics only logging reads (gradient norms) are computed then
        for opt in self.optimizers().values():
            opt.set_lr_scale(scale)
            opt.set_logged(logged)
        metrics: dict[str, float | torch.Tensor] = {}
        try:
            with self.autocast():
                metrics.update(self.rollout_and_update(cfg.batch_size))
        except Exception as err:  # a plugin failing in its own code or breaking its contract: name it and say when
            if self.fall_back_from_compile(err):  # before any optimiser step of the failing network
                return self.run_iteration(window)
            failure = self.plugin_owners.failure(err, f"at step {self.step + 1}", "the last checkpoint is kept")
            if failure is None:
                raise
            raise failure from err
        metrics.update(getattr(self.reward, "last_terms", None) or {})  # a composite reward's per-term means
        metrics = metric_floats(metrics)
        if cfg.skip_nonfinite or cfg.mixed_precision == "fp16":  # fp16's overflow steps are skipped steps too
            metrics["skipped_steps"] = float(self.total_skipped_steps())
        check_finite(metrics, self.step + 1)
        if self.ema is not None:
            self.ema.update(self.backbone)
        return metrics

    def rollout_and_update(self, batch_size: int) -> dict[str, float | torch.Tensor]:
        """Steps 1-4 of the iteration (module docstring): data, rollout, the learning reward's and the algorithm's
        updates; returns their metrics (floats, or 0-d tensors that `metric_floats` reads)."""
        metrics: dict[str, float | torch.Tensor] = {}
        trajectory = None
        real, real_condition = self.real_batch(batch_size)
        if self.algorithm.needs_rollout:
            with self.phases.phase("rollout"):
                self.backbone.eval()  # rollouts sample the policy that is evaluated and optimised: no dropout
                condition = self.rollout_conditions(batch_size, real_condition)
                trajectory = self.backbone.sample(batch_size, self.train_gen, condition=condition)
            if self.reward is not None and self.reward.learns:
                with self.phases.phase("reward_update"):
                    fake = self.backbone.output(trajectory.final)
                    if condition is None:
                        metrics.update(self.reward.update(real, fake))
                    else:  # E(x, c): the data with their conditions against the samples with theirs
                        metrics.update(self.reward.update(real, fake, real_condition, condition))
        self.backbone.train(self.backbone_training)  # the mode the algorithm's update declares
        try:
            given = {} if self.conditions is None else {"real_condition": real_condition}
            with self.phases.phase("algorithm_update"):  # less the phases the algorithm times itself
                metrics.update(self.algorithm.update(real, trajectory, self.train_gen, **given))
        finally:
            self.backbone.eval()  # at rest
        return metrics


SUPPORTED = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_XPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU", "MULTI_SDAA",
             "MULTI_NEURON", "FSDP"}
"""accelerate's distributed types the trainer runs: data parallel (replicated parameters, gradients averaged in
`GradStep`) and FSDP (the backbone's network sharded with FSDP2, `sharding.py`)."""


def check_distributed_type(accelerator) -> None:
    """Refuse, in one line, a launch whose parallelism the trainer would not apply (DeepSpeed, Megatron-LM, XLA):
    rewardtune drives its networks through its own `GradStep`s, which those engines replace."""
    kind = getattr(getattr(accelerator, "distributed_type", None), "name", "NO")
    for engine in ("DEEPSPEED", "MEGATRON_LM"):  # CPU processes keep the request only in the environment
        if os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true":
            kind = engine
    if kind not in SUPPORTED:
        raise RecipeError(
            f"accelerate was launched with {kind}, which rewardtune does not run: launch data parallel (--multi_gpu) "
            "or sharded with FSDP2 (recipes/accelerate/fsdp.yaml); docs/architecture.md, Multiple processes"
        )


def check_launch_precision(accelerator, mixed_precision: str) -> None:
    """`accelerate launch --mixed_precision X` (or a config file's) must agree with the recipe's [train]
    mixed_precision, which is what the trainer applies: a launch flag it would not use is refused, not ignored."""
    launched = str(getattr(accelerator, "mixed_precision", "no") or "no")
    if launched != "no" and launched != mixed_precision:
        raise RecipeError(
            f"accelerate was launched with mixed_precision {launched!r} but the recipe's train.mixed_precision is "
            f"{mixed_precision!r}: the recipe's is the one applied, so set it (--set train.mixed_precision={launched}) "
            "or launch with --mixed_precision no"
        )


@contextlib.contextmanager
def plot_path(path: Path, *, keep: bool):
    """`path` itself when `keep`, else the same name in a temporary folder deleted afterwards: a sharded backbone's
    sampling is a collective, so every rank draws the plot and only the main process keeps it."""
    if keep:
        yield path
        return
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder) / path.name


def update_mode_is_train(algorithm) -> bool:
    """Whether `algorithm.update` trains the backbone in train mode: its `backbone_mode`, "train" or "eval" (default).

    Fine-tuning algorithms declare "eval": the policy that is optimised is the one that is sampled (a PPO ratio is 1 on
    its first pass only if the log-probs are recomputed with the sampling network). Pretraining declares "train"
    (dropout regularises the denoising loss)."""
    mode = getattr(algorithm, "backbone_mode", "eval")
    if mode not in ("train", "eval"):
        raise PluginError(f"algorithm {type(algorithm).__name__} declares backbone_mode = {mode!r}; use 'train' or 'eval'")
    return mode == "train"


def install_stop_handlers(callback) -> dict | None:
    """Route SIGINT and SIGTERM to `callback(signum)` (main thread only); returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, frame: callback(signum))
    return previous


def restore_handlers(previous: dict | None) -> None:
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler)


def metric_floats(metrics: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """`metrics` with every tensor value (a 0-d tensor an update returned, e.g. a loss) read as a float: the tensors
    of each device and dtype are stacked and copied to the host together (DxDP's: one float32 and one float64 copy),
    so an iteration waits for its device once instead of once per metric. The floats are those `.item()` reads."""
    groups: dict[tuple, list[str]] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            groups.setdefault((value.device, value.dtype), []).append(name)
    if not groups:
        return metrics
    read: dict[str, float] = {}
    with torch.no_grad():
        for names in groups.values():
            values = [metrics[name] for name in names]
            read.update(zip(names, torch.stack([v if v.dim() == 0 else v.reshape(()) for v in values]).tolist()))
    return {name: read.get(name, value) for name, value in metrics.items()}


def check_finite(metrics: dict[str, float], step: int) -> None:
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise NonFiniteError(f"{name} became {value} at step {step}; the last checkpoint is kept")


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def broadcast_modules(modules: dict[str, torch.nn.Module]) -> None:
    """Copy rank 0's parameters and buffers to every rank (no-op in one process). A status exchange first checks
    that every rank holds as many tensors, elements and bytes (ranks that built different modules raise
    `DisagreementError` instead of broadcasting mismatched tensors)."""
    if agreement.world_size() == 1:
        return
    tensors, seen = [], set()
    for module in modules.values():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                tensors.append(tensor)
    sizes = (len(tensors), sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors))
    agreement.exchange(Point.BROADCAST, tensors[0].device if tensors else "cpu", values=sizes)
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


