"""Running recipes from Python: `run_recipe`, `load_run`. The CLI is a thin layer over these."""

from __future__ import annotations

import tomllib
from pathlib import Path

from rewardtune import checkpoint as ckpt
from rewardtune.build import (
    RUN_RECIPE,
    Experiment,
    build_experiment,
    read_run_recipe,
    with_seed,
)
from rewardtune.errors import CheckpointError, RecipeError, RewardtuneError
from rewardtune.recipe import (
    Recipe,
    load_recipe,
    parse_recipe,
    read_toml,
    recipe_to_toml,
)
from rewardtune.trainer import Reporter, Trainer

RECIPE_FILE = RUN_RECIPE


def make_accelerator():
    import torch
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def prepare_out_dir(out_dir: Path, recipe: Recipe, *, resume: bool, force: bool) -> None:
    """Create the run directory and store the resolved recipe; refuse to mix runs of different recipes."""
    check_out_dir(out_dir, recipe, resume=resume, force=force)
    write_recipe(out_dir, recipe)


def check_out_dir(out_dir: Path, recipe: Recipe, *, resume: bool, force: bool) -> None:
    """Refuse to mix runs of different recipes (unless `force`), then create the run directory."""
    saved = out_dir / RECIPE_FILE
    if saved.exists():
        previous = read_toml(saved)
        if previous != tomllib.loads(recipe_to_toml(recipe)):
            if not force:
                raise RecipeError(
                    f"{out_dir} holds a run of a different recipe; use another --out, or --force to overwrite its recipe"
                )
        elif not resume and (out_dir / "checkpoints").exists() and not force:
            raise RecipeError(f"{out_dir} already holds this run; pass --resume to continue it or --out for a new one")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RewardtuneError(f"cannot write to {out_dir}: {err.strerror or err}") from None


def write_recipe(out_dir: Path, recipe: Recipe) -> None:
    """Store the resolved recipe as `<out_dir>/recipe.toml` (temporary file + rename)."""
    try:
        tmp = out_dir / f".{RECIPE_FILE}.tmp"
        tmp.write_text(recipe_to_toml(recipe))
        tmp.replace(out_dir / RECIPE_FILE)
    except OSError as err:
        raise RewardtuneError(f"cannot write to {out_dir}: {err.strerror or err}") from None


def run_recipe(
    recipe: Recipe | str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    reporter: Reporter | None = None,
    accelerator=None,
) -> dict:
    """Run a recipe into `out_dir`; returns eval.json's content. Pretraining recipes named by
    `backbone.init_from` run first into `<out_dir>/pretrain`, a teacher recipe named by `distill.teacher` into
    `<out_dir>/teacher` (each reused when already finished)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out_dir = Path(out_dir)
    accelerator = accelerator or make_accelerator()
    if accelerator.is_main_process:
        check_out_dir(out_dir, recipe, resume=resume, force=force)
    accelerator.wait_for_everyone()

    def pretrain(path: Path, sub_dir: Path, seed: int) -> Path:
        sub = with_seed(load_recipe(path), seed)
        if finished(sub_dir, sub):
            if reporter is not None:
                reporter.message(f"reusing the finished pretraining run in {sub_dir}")
            return sub_dir
        if reporter is not None:
            reporter.message(f"pretraining: {path.name} -> {sub_dir}")
        run_recipe(sub, sub_dir, resume=True, force=True, reporter=reporter, accelerator=accelerator)
        return sub_dir

    experiment = build_experiment(recipe, out_dir, run_recipe=pretrain)
    trainer = make_trainer(experiment, out_dir, reporter, accelerator)
    if resume:  # before recipe.toml is replaced: a checkpoint that does not fit leaves the run directory as it was
        trainer.resume()
    if accelerator.is_main_process:
        write_recipe(out_dir, recipe)
    return trainer.fit()


def make_trainer(experiment: Experiment, out_dir: Path | None, reporter, accelerator) -> Trainer:
    return Trainer(
        backbone=experiment.backbone,
        algorithm=experiment.algorithm,
        reward=experiment.reward,
        data=experiment.data,
        evaluator=experiment.evaluator,
        config=experiment.recipe.train,
        eval_config=experiment.recipe.eval,
        out_dir=out_dir,
        reporter=reporter,
        accelerator=accelerator,
    )


def finished(run_dir: Path, recipe: Recipe) -> bool:
    """Whether `run_dir` holds a completed run of exactly this recipe."""
    import json

    try:
        saved = tomllib.loads((run_dir / RECIPE_FILE).read_text())
        result = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return False
    return saved == tomllib.loads(recipe_to_toml(recipe)) and result.get("step") == recipe.train.steps


def load_run(
    run_dir: str | Path, *, accelerator=None, reporter=None, best: bool = False, step: int | None = None
) -> Trainer:
    """A Trainer holding a run's latest checkpoint, its best one (`best`) or the kept one of `step`, for eval and
    sample."""
    run_dir = Path(run_dir)
    raw = read_run_recipe(run_dir)
    teacher = raw.get("distill", {}).get("teacher", "")
    if teacher.endswith(".toml"):  # a teacher recipe was run into <run>/teacher
        raw["distill"]["teacher"] = str(run_dir / "teacher")
    if "distill" in raw:
        raw["distill"]["init_from_teacher"] = False  # the checkpoint holds the student's weights
    recipe = parse_recipe(raw, run_dir / RECIPE_FILE)
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if best:
        latest = run_dir / "checkpoints" / "best"
        if not latest.is_dir() and (run_dir / "checkpoints" / ".old_best").is_dir():  # a crash while replacing it
            latest = run_dir / "checkpoints" / ".old_best"
        if not latest.is_dir():
            raise CheckpointError(f"{run_dir} has no best checkpoint (set eval.keep_best to keep one)")
    if step is not None:
        latest = run_dir / "checkpoints" / ckpt.checkpoint_name(step)
        if not latest.is_dir():
            kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else []
            raise CheckpointError(f"{run_dir} keeps no checkpoint of step {step} (kept: {', '.join(kept) or 'none'})")
    if latest is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet")
    trainer = make_trainer(build_experiment(recipe), run_dir, reporter, accelerator or make_accelerator())
    trainer.load(latest)
    return trainer
