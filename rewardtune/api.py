"""Running recipes from Python: `run_recipe`, `build_trainer`, `load_run`, `sample`, `make_recipe`,
`seed_everything`. The CLI is a thin layer over these."""

from __future__ import annotations

import tomllib
from pathlib import Path

from rewardtune import checkpoint as ckpt
from rewardtune.build import (
    RUN_RECIPE,
    Experiment,
    build_experiment,
    checkpoint_replaced,
    read_run_recipe,
    with_seed,
)
from rewardtune.errors import CheckpointError, RecipeError, RewardtuneError
from rewardtune.precision import slow_precision_warning
from rewardtune.recipe import (
    Recipe,
    apply_override,
    load_recipe,
    parse_recipe,
    read_toml,
    recipe_to_toml,
    recipe_warnings,
)
from rewardtune.resume import (
    Change,
    check_resume,
    describe,
    recipe_changes,
    restarts_best,
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
        changes = recipe_changes(saved_recipe(out_dir), recipe_as_saved(recipe))
        if changes:
            if not force:
                changed = ", ".join(c.key for c in changes[:5]) + (", ..." if len(changes) > 5 else "")
                raise RecipeError(
                    f"{out_dir} holds a run of a different recipe ({changed} changed); use another --out, or --force "
                    "to overwrite its recipe"
                )
        elif not resume and (out_dir / "checkpoints").exists() and not force:
            raise RecipeError(f"{out_dir} already holds this run; pass --resume to continue it or --out for a new one")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RewardtuneError(f"cannot write to {out_dir}: {err.strerror or err}") from None


def saved_recipe(out_dir: Path) -> dict:
    """The recipe a run directory stores, resolved again by this version of rewardtune, so that an option added
    since (with its default) is no change; the stored table itself when it no longer parses."""
    path = out_dir / RECIPE_FILE
    raw = read_toml(path)
    try:
        return tomllib.loads(recipe_to_toml(parse_recipe(raw, path)))
    except RewardtuneError:
        return raw


def recipe_as_saved(recipe: Recipe) -> dict:
    """`recipe` as recipe.toml stores it (TOML types: lists, no None)."""
    return tomllib.loads(recipe_to_toml(recipe))


def resume_changes(out_dir: Path, recipe: Recipe) -> list[Change]:
    """The settings `recipe` changes in the run that `out_dir` resumes, all of them ones a resume applies
    (`resume.RESUME_POLICY`); any other is refused with a RecipeError naming it. Empty when there is no checkpoint to
    resume from (the run starts afresh)."""
    if not (out_dir / RECIPE_FILE).is_file() or ckpt.latest_checkpoint(out_dir / "checkpoints") is None:
        return []
    return check_resume(saved_recipe(out_dir), recipe_as_saved(recipe), str(out_dir))


def continue_with(trainer: Trainer, changes: list[Change], recipe: Recipe, reporter: Reporter | None) -> None:
    """After the checkpoint loaded into the changed recipe's objects: start the keep-best record over when its
    values are no longer comparable, check that `eval.keep_best` names a metric, and say what changed."""
    if restarts_best(changes, recipe_as_saved(recipe)):
        trainer.best = None
    name = trainer.eval_config.keep_best
    if name and trainer.initial_metrics is not None and name not in trainer.initial_metrics:
        raise RecipeError(f"eval.keep_best = {name!r} is not a metric of this run ({', '.join(trainer.initial_metrics)})")
    if changes and reporter is not None:
        reporter.message(f"resuming with changed settings: {describe(changes)}")


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
    changes = resume_changes(out_dir, recipe) if resume else []  # on every rank: a refusal stops them all
    resuming = resume and ckpt.latest_checkpoint(out_dir / "checkpoints") is not None
    if accelerator.is_main_process:
        check_out_dir(out_dir, recipe, resume=resume, force=force)
    accelerator.wait_for_everyone()
    for warning in recipe_warnings(recipe) if reporter is not None else []:  # settings that make a step do nothing
        reporter.message(f"warning: {warning}")

    replaced = checkpoint_replaced(recipe.resolved) if resuming else recipe.resolved  # work the checkpoint replaces
    built = parse_recipe(replaced, recipe.path) if replaced != recipe.resolved else recipe
    experiment = build_experiment(built, out_dir, run_recipe=pretraining_runner(reporter, accelerator), reporter=reporter)
    trainer = make_trainer(experiment, out_dir, reporter, accelerator)
    slow = slow_precision_warning(trainer.device, trainer.config.mixed_precision)
    if slow is not None and reporter is not None:
        reporter.message(f"warning: {slow}")
    if resume and trainer.resume() is not None:  # before recipe.toml is replaced: a checkpoint that does not fit
        continue_with(trainer, changes, recipe, reporter)  # leaves the run directory as it was
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
        plugin_owners=experiment.plugin_owners,
        conditions=experiment.conditions,
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


def require_recipe(run_dir: Path) -> None:
    """Say in one line why a directory a hand-composed Trainer wrote (checkpoints, no recipe.toml) cannot be read."""
    if not (run_dir / RECIPE_FILE).is_file() and (run_dir / "checkpoints").is_dir():
        raise CheckpointError(
            f"{run_dir} has checkpoints but no {RECIPE_FILE}: a Trainer composed in Python wrote it, and its pieces "
            "cannot be rebuilt; build the trainer with rewardtune.build_trainer(recipe, out_dir) for a run directory "
            "that eval and sample read (docs/recipes.md, Python API)"
        )


def load_run(
    run_dir: str | Path, *, accelerator=None, reporter=None, best: bool = False, step: int | None = None,
    build_overrides: list[str] | None = None,
) -> Trainer:
    """A Trainer holding a run's latest checkpoint, its best one (`best`) or the kept one of `step`, for eval and
    sample. `build_overrides` (`table.key=value`) change how the objects are built before the checkpoint loads over
    them: only settings whose effect the checkpoint replaces. Factories' own `checkpoint_replaces` (the autoencoder
    energy's pretraining) are applied first (`build.checkpoint_replaced`)."""
    run_dir = Path(run_dir)
    require_recipe(run_dir)
    raw = read_run_recipe(run_dir)
    raw = checkpoint_replaced(raw)  # the checkpoint loads over every object: skip work it replaces
    for item in build_overrides or []:
        apply_override(raw, item)
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


# ---- sampling a run ------------------------------------------------------------------------------------------------
def sample(
    run_dir: str | Path,
    n: int,
    *,
    labels=None,
    prompts=None,
    seed: int = 0,
    best: bool = False,
    guidance: float = 0.0,
    cfg_scale: float | None = None,
    rejection: str | None = None,
    budget: float = 2.0,
):
    """Samples of a run's latest (or best) checkpoint, what `rewardtune sample` writes.

    An unconditional run draws `n` samples. A conditional run draws `n` samples per condition: per class label in
    `labels` (a label-conditioned run), per prompt in `prompts` (a prompt-conditioned run; prompts it was not trained
    on are embedded by its text encoder), or, with neither, per training condition of the run. Repeated conditions
    count once.

    Args:
        run_dir: a run directory (`rewardtune run`, `run_recipe`, `build_trainer(...).fit()`).
        n: samples (per condition for a conditional run), >= 1.
        labels: class labels in 0..K-1, or None.
        prompts: prompts, or None.
        seed: the sampling seed.
        best: sample checkpoints/best instead of the latest checkpoint.
        guidance: value guidance scale lambda (0: none; needs a value function).
        cfg_scale: classifier-free guidance scale to sample with (None: the run's own; conditional runs).
        rejection: keep samples by rejection on the run's estimate of log p / p~ (`rejection.py`): "drs" or
            "budgeted" (OBRS with `budget` = K proposals per kept sample); None: every sample. Needs an algorithm
            with `log_ratio(x)` (`discriminator_guidance`) and an unconditional run.
    Returns:
        (samples [N, *sample_shape] on the CPU, the condition of each sample (N rows, on the CPU; prompts come with
        their embeddings) or None for an unconditional run). Samples of one condition are consecutive rows.
    Raises:
        RewardtuneError: conditions an unconditional run cannot take, labels for a prompt run (or prompts for a
            label run), a label out of range, an empty prompt; a run directory that cannot be loaded; `rejection`
            for a run without a density ratio, a conditional run, an unknown rule or a budget below 1.
    """
    trainer = load_run(run_dir, best=best)
    if cfg_scale is not None:
        set_cfg_scale(trainer, cfg_scale)
    if rejection is not None:
        return sample_by_rejection(trainer, n, rejection, budget, seed=seed, guidance=guidance), None
    return sample_trainer(trainer, n, labels=labels, prompts=prompts, seed=seed, guidance=guidance, run=str(run_dir))


def sample_by_rejection(trainer: Trainer, n: int, rule: str, budget: float, *, seed: int = 0, guidance: float = 0.0,
                        calibration: int = 2000):
    """n samples of a loaded unconditional run kept by rejection (`rejection.py`) on its algorithm's `log_ratio`:
    proposals in batches of max(n, 500), the rule calibrated on a first batch of max(n, `calibration`) proposals.
    Returns [n, ...] on the CPU. Raises RecipeError where `sample`'s docstring says."""
    import torch

    from rewardtune.rejection import RULES, acceptance_rule, rejection_sample

    log_ratio = getattr(trainer.algorithm, "log_ratio", None)
    if log_ratio is None:
        raise RecipeError(f"--rejection needs a run that estimates a density ratio (algorithm "
                          f"discriminator_guidance); this run's algorithm is {type(trainer.algorithm).__name__}")
    if trainer.conditions is not None:
        raise RecipeError("--rejection: conditional runs are not supported (the ratio would be per condition)")
    if rule not in RULES:
        raise RecipeError(f"--rejection {rule!r}: expected one of {', '.join(RULES)}")
    if not budget >= 1.0:
        raise RecipeError(f"--budget must be >= 1 (proposals per kept sample on average), got {budget}")
    generator = torch.Generator().manual_seed(seed)

    def propose(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = sample_trainer(trainer, m, seed=int(torch.randint(0, 2**62, (1,), generator=generator)),
                           guidance=guidance)[0]
        return x, log_ratio(x.to(trainer.device)).cpu()

    with trainer.plugin_owners.attributing("while sampling"):
        accept = acceptance_rule(rule, propose(max(n, calibration))[1], budget=budget)
        try:
            return rejection_sample(propose, accept, n, generator, batch=max(n, 500), max_proposals=max(100 * n, 10**5))[0]
        except RuntimeError as err:  # DRS whose ratio spans too much: the budgeted rule bounds the cost
            raise RecipeError(f"--rejection {rule}: {err}; try --rejection budgeted --budget K") from None


def sample_trainer(trainer: Trainer, n: int, *, labels=None, prompts=None, seed: int = 0, guidance: float = 0.0,
                   run: str = "this run"):
    """`sample` from a loaded trainer (`load_run`); `run` names it in messages."""
    import torch

    from rewardtune.build import value_guide
    from rewardtune.sampling import requested_conditions

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    wanted = requested_conditions(trainer.conditions, labels, prompts, run)  # one row per condition, or None
    backbone = trainer.evaluated_backbone()
    guide = value_guide(trainer.algorithm, guidance, "--guidance") if guidance else None
    gen = torch.Generator(device=backbone.device).manual_seed(seed)
    with trainer.plugin_owners.attributing("while sampling"), trainer.autocast():  # the run's precision
        if wanted is None:
            return trainer.evaluator.draw(backbone, n, gen, guide), None
        rows = wanted.select(torch.arange(len(wanted)).repeat_interleave(n))  # condition i in rows i*n .. i*n+n-1
        condition = trainer.conditions.encode(rows, backbone.device)
        samples = trainer.evaluator.draw(backbone, len(condition), gen, guide, condition)
    return samples, condition.to("cpu")


def set_cfg_scale(trainer: Trainer, scale: float) -> None:
    """Sample the loaded run with classifier-free guidance scale `scale` from now on (its trained and EMA weights).

    Raises:
        RecipeError: the run is unconditional, or the scale is not finite.
    """
    from rewardtune.backbones.epsilon import check_cfg_scale

    for backbone in {id(b): b for b in (trainer.backbone, trainer.evaluated_backbone())}.values():
        if not hasattr(backbone, "cfg_scale"):
            raise RecipeError(f"--cfg-scale: backbone {type(backbone).__name__} has no classifier-free guidance")
        try:
            backbone.cfg_scale = check_cfg_scale(scale, backbone.conditioning)
        except ValueError as err:
            raise RecipeError(f"--cfg-scale: {err}") from None


def is_conditional_run(run_dir: str | Path) -> bool:
    """Whether the run in `run_dir` is conditional (its recipe has a [conditions] table)."""
    run_dir = Path(run_dir)
    require_recipe(run_dir)
    return "conditions" in read_run_recipe(run_dir)


# ---- the Python path: recipes from dicts, trainers that write CLI-readable run directories, seeding --------------
def make_recipe(tables: dict, overrides: list[str] | None = None) -> Recipe:
    """A recipe from Python dicts mirroring the TOML tables, validated exactly like a recipe file.

    `tables` is e.g. `{"data": {"kind": "8gaussians"}, "backbone": {"kind": "mlp", "num_steps": 5}, ...}`: the same
    tables, keys and defaults as docs/recipes.md; tuples may stand for lists. `overrides` are `table.key=value`
    strings, as `--set` takes them. Relative paths in it (`backbone.init_from`, `distill.teacher`) are taken from
    the working directory. Raises RecipeError for anything a recipe file would be refused for, and for a value TOML
    cannot store (the run directory keeps the recipe as recipe.toml).
    """
    if not isinstance(tables, dict):
        raise RecipeError(f"a recipe is a dict of tables, got {type(tables).__name__}")
    raw = as_toml_tables(tables)
    for item in overrides or []:
        apply_override(raw, item)
    return parse_recipe(raw)


def as_toml_tables(value, key: str = ""):
    """A deep copy of `value` (at dotted `key`) with tuples as lists; RecipeError naming the key for a value TOML
    cannot hold (None, a Path, a tensor, ...)."""
    if isinstance(value, dict):
        return {str(k): as_toml_tables(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_toml_tables(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (bool, int, float, str)):
        return value
    raise RecipeError(f"recipe {key}: {value!r} ({type(value).__name__}) is not a TOML value (a bool, number, string, list or table)")


def pretraining_runner(reporter: Reporter | None, accelerator):
    """`run_recipe(recipe_path, out_dir, seed)` for `build_experiment`: runs a pretraining (or teacher) recipe into
    `out_dir`, or reuses it there when it already finished."""

    def run_sub_recipe(path: Path, sub_dir: Path, seed: int) -> Path:
        sub = with_seed(load_recipe(path), seed)
        if finished(sub_dir, sub):
            if reporter is not None:
                reporter.message(f"reusing the finished pretraining run in {sub_dir}")
            return sub_dir
        if reporter is not None:
            reporter.message(f"pretraining: {path.name} -> {sub_dir}")
        run_recipe(sub, sub_dir, resume=True, force=True, reporter=reporter, accelerator=accelerator)
        return sub_dir

    return run_sub_recipe


def build_trainer(
    recipe: Recipe | str | Path,
    out_dir: str | Path | None = None,
    *,
    force: bool = False,
    reporter: Reporter | None = None,
    accelerator=None,
) -> Trainer:
    """The Trainer of a recipe (a path, `load_recipe(...)` or `make_recipe(...)`), ready to `fit()`.

    With `out_dir` it checks the directory like `rewardtune run` (a different recipe, or this one already
    checkpointed, needs `force`), runs the recipes `backbone.init_from` / `distill.teacher` name into
    `<out_dir>/pretrain` / `<out_dir>/teacher`, and writes the resolved recipe.toml before it returns: `fit()` then
    leaves a run directory that `rewardtune eval`, `sample` and `run --resume` read. Without `out_dir` nothing is
    written (and `init_from` must name a run directory). The trainer's `backbone`, `reward`, `algorithm`, `data`
    and `evaluator` are the recipe's objects; initial weights follow `train.seed`. Progress goes to `reporter`
    (e.g. `RichReporter()`, the CLI's). To continue a stopped run use `run_recipe(..., resume=True)`.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    accelerator = accelerator or make_accelerator()
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        if accelerator.is_main_process:
            check_out_dir(out_dir, recipe, resume=False, force=force)
        accelerator.wait_for_everyone()
    for warning in recipe_warnings(recipe) if reporter is not None else []:  # as `rewardtune run` says them
        reporter.message(f"warning: {warning}")
    experiment = build_experiment(recipe, out_dir, run_recipe=pretraining_runner(reporter, accelerator))
    trainer = make_trainer(experiment, out_dir, reporter, accelerator)
    if out_dir is not None and accelerator.is_main_process:
        write_recipe(out_dir, recipe)
    return trainer


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy's global generator and torch's (CPU and every CUDA device) with `seed`.

    The public builders (`build_mlp_backbone`, `build_time_mlp_value`, `build_energy_reward`, the plugins'
    factories) draw initial weights from torch's global generator, as torch modules do; call this before building
    the pieces of a hand-composed experiment to make it reproducible. (`build_trainer` and `run_recipe` seed torch
    with `train.seed` themselves; the Trainer's data, rollout and evaluation streams derive from `TrainConfig.seed`.)
    """
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every device's default generator, CUDA included
