"""Recipe -> objects: data, backbone (with pretrained weights), value, reward, algorithm, evaluator.

`build_experiment` constructs everything a `Trainer` needs from a validated `Recipe`. A backbone's `init_from`
names where its starting weights come from: a run directory (its latest checkpoint) or another recipe (.toml), which
is run first into `<out_dir>/pretrain` (and reused when it already finished there). A [distill] table's `teacher`
is resolved the same way (a recipe runs into `<out_dir>/teacher`) and loaded frozen (`load_teacher`).

Paths: a recipe (.toml) is looked up next to the recipe that names it; a run directory relative to the working
directory first, then next to the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rewardtune import checkpoint as ckpt
from rewardtune.errors import CheckpointError, RecipeError
from rewardtune.recipe import PluginSpec, Recipe, parse_recipe, read_toml
from rewardtune.registry import REGISTRIES, context_parameters
from rewardtune.types import Teacher

RUN_RECIPE = "recipe.toml"  # the resolved recipe a run directory keeps


@dataclass
class Experiment:
    recipe: Recipe
    data: object
    backbone: torch.nn.Module
    value: torch.nn.Module | None
    reward: torch.nn.Module | None
    algorithm: object
    evaluator: object


def call_factory(section: str, spec: PluginSpec, context: dict) -> object:
    factory = REGISTRIES[section].get(spec.kind)
    missing = [name for name in context_parameters(factory) if name not in context]
    if missing:
        raise RecipeError(f"[{section}] kind {spec.kind!r} asks for {missing[0]!r}, which is not built before [{section}]")
    args = [context[name] for name in context_parameters(factory)]
    try:
        return factory(*args, **spec.options)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"[{section}] kind {spec.kind!r}: {err}") from None


def build_experiment(recipe: Recipe, out_dir: Path | None = None, run_recipe: Callable | None = None) -> Experiment:
    """Construct the objects of a recipe. `run_recipe(recipe_path, out_dir, seed)` runs a pretraining recipe."""
    teacher = None
    if recipe.distill is not None:  # first: building the teacher seeds torch with the teacher's seed
        teacher_dir = resolve_run_path(recipe.distill.teacher, "distill.teacher", recipe, out_dir, run_recipe, "teacher")
        teacher = load_teacher(teacher_dir)
    torch.manual_seed(recipe.train.seed)  # identical initial weights on every process
    plugins = recipe.plugins
    data = call_factory("data", plugins["data"], {})
    context: dict = {"sample_shape": tuple(data.sample_shape), "teacher": teacher}
    backbone = call_factory("backbone", plugins["backbone"], context)
    context.update(backbone=backbone, num_steps=backbone.num_steps, value=None, reward=None)
    init_from = plugins["backbone"].extra.get("init_from")
    if init_from:
        path = resolve_run_path(init_from, "backbone.init_from", recipe, out_dir, run_recipe, "pretrain")
        load_initial_weights(backbone, path)
    elif teacher is not None and recipe.distill.init_from_teacher:
        copy_teacher_network(teacher, backbone)
    if "value" in plugins:
        context["value"] = call_factory("value", plugins["value"], context)
    if "reward" in plugins:
        context["reward"] = call_factory("reward", plugins["reward"], context)
    algorithm = call_factory("algorithm", plugins["algorithm"], context)
    evaluator = make_evaluator(data, recipe)
    return Experiment(recipe, data, backbone, context["value"], context["reward"], algorithm, evaluator)


def make_evaluator(data, recipe: Recipe):
    """Images (C, H, W) get the FID/precision/recall evaluator; vectors the sliced-Wasserstein one."""
    cfg = recipe.eval
    if len(data.sample_shape) == 3:
        from rewardtune.image_evaluation import ImageEvaluator

        return ImageEvaluator(
            data, num_samples=cfg.num_samples, feature_extractor=cfg.feature_extractor,
            reference_samples=cfg.reference_samples,
        )
    from rewardtune.evaluation import ToyEvaluator

    return ToyEvaluator(data, num_samples=cfg.num_samples, repeats=cfg.repeats)


def resolve_run_path(
    value: str, key: str, recipe: Recipe, out_dir: Path | None, run_recipe: Callable | None, sub_dir: str
) -> Path:
    """The run directory `value` names: a run directory, or a recipe (.toml) run first into `<out_dir>/<sub_dir>`."""
    path = Path(value)
    if path.suffix == ".toml":
        path = path if path.is_absolute() else recipe.base_dir() / path
        if run_recipe is None or out_dir is None:
            raise RecipeError(f"{key} = {value!r} names a recipe; run it first and point at its run directory")
        return run_recipe(path, out_dir / sub_dir, recipe.train.seed)
    if not path.is_absolute() and not path.exists() and (recipe.base_dir() / path).exists():
        path = recipe.base_dir() / path
    if not path.exists():
        raise CheckpointError(f"{key}: {path} does not exist")
    return path


def read_run_recipe(run_dir: Path, what: str = "") -> dict:
    """The raw recipe stored in a run directory, without `backbone.init_from` (the checkpoint supersedes it)."""
    recipe_file = run_dir / RUN_RECIPE
    if not recipe_file.is_file():
        raise CheckpointError(f"{what}{run_dir} is not a run directory (no {RUN_RECIPE})")
    raw = read_toml(recipe_file)
    raw.get("backbone", {}).pop("init_from", None)
    return raw


def load_teacher(run_dir: Path) -> Teacher:
    """A finished run's backbone (its EMA weights when it kept an EMA) and reward, frozen, from its latest checkpoint."""
    raw = read_run_recipe(run_dir, "distill.teacher: ")
    if "distill" in raw:
        raise RecipeError(f"distill.teacher: {run_dir} is itself a distilled student; name a T-step teacher")
    experiment = build_experiment(parse_recipe(raw, run_dir / RUN_RECIPE))
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise CheckpointError(f"distill.teacher: no checkpoint in {run_dir}")
    weights, _, _ = ckpt.read_checkpoint(latest)
    modules = {"backbone": experiment.backbone, **experiment.algorithm.modules()}
    if experiment.reward is not None:
        modules["reward"] = experiment.reward
    ckpt.load_modules(modules, weights)
    ema = {k[len("ema.") :]: v for k, v in weights.items() if k.startswith("ema.")}
    if ema:
        ckpt.load_modules({"backbone": experiment.backbone}, {f"backbone.{k}": v for k, v in ema.items()})
    for module in modules.values():
        module.requires_grad_(False).eval()
    return Teacher(backbone=experiment.backbone, reward=experiment.reward, run_dir=str(run_dir))


def copy_teacher_network(teacher: Teacher, student) -> None:
    """Start the student's network from the teacher's (not its sigma_t, which depend on T)."""
    source, wanted = teacher.backbone.network_state(), student.network_state()
    mismatch = [k for k in wanted if k not in source or source[k].shape != wanted[k].shape]
    if mismatch or len(source) != len(wanted):
        raise RecipeError(
            f"[distill] init_from_teacher: the student's network differs from the teacher's {teacher.run_dir} "
            f"(first difference: {(mismatch or sorted(set(source) - set(wanted)))[0]}); set init_from_teacher = false"
        )
    student.load_state_dict({k: v.clone() for k, v in source.items()}, strict=False)


def load_initial_weights(backbone, run_dir: Path) -> None:
    """Load the backbone's network (not its sigma_t, which depend on T) from a run's latest checkpoint."""
    root = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    latest = ckpt.latest_checkpoint(root) if (root / ckpt.LATEST).exists() else (root if (root / "model.safetensors").exists() else None)
    if latest is None:
        raise CheckpointError(f"backbone.init_from: no checkpoint in {run_dir}")
    weights, _, _ = ckpt.read_checkpoint(latest)
    source = "ema." if any(k.startswith("ema.") for k in weights) else "backbone."
    wanted = backbone.network_state()
    missing = [k for k in wanted if source + k not in weights]
    if missing:
        raise CheckpointError(f"backbone.init_from: {latest} lacks {missing[0]} (a different backbone?)")
    state = {k: weights[source + k] for k in wanted}
    for k, v in state.items():
        if v.shape != wanted[k].shape:
            raise CheckpointError(f"backbone.init_from: {k} has shape {tuple(v.shape)} there, {tuple(wanted[k].shape)} here")
    backbone.load_state_dict(state, strict=False)


def with_seed(recipe: Recipe, seed: int) -> Recipe:
    train = replace(recipe.train, seed=seed)
    resolved = {**recipe.resolved, "train": {**recipe.resolved["train"], "seed": seed}}
    return replace(recipe, train=train, resolved=resolved)
