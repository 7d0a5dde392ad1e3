"""Recipe -> objects: data, backbone (with pretrained weights), value, reward, algorithm, evaluator.

`build_experiment` constructs everything a `Trainer` needs from a validated `Recipe`. A backbone's `init_from`
names where its starting weights come from: a run directory (its latest checkpoint) or another recipe (.toml), which
is run first into `<out_dir>/pretrain` (and reused when it already finished there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rewardtune import checkpoint as ckpt
from rewardtune.errors import CheckpointError, RecipeError
from rewardtune.recipe import PluginSpec, Recipe
from rewardtune.registry import REGISTRIES, context_parameters


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
    torch.manual_seed(recipe.train.seed)  # identical initial weights on every process
    plugins = recipe.plugins
    data = call_factory("data", plugins["data"], {})
    context: dict = {"sample_shape": tuple(data.sample_shape)}
    backbone = call_factory("backbone", plugins["backbone"], context)
    context.update(backbone=backbone, num_steps=backbone.num_steps, value=None, reward=None)
    init_from = plugins["backbone"].extra.get("init_from")
    if init_from:
        load_initial_weights(backbone, resolve_init(init_from, recipe, out_dir, run_recipe))
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


def resolve_init(init_from: str, recipe: Recipe, out_dir: Path | None, run_recipe: Callable | None) -> Path:
    """The run directory whose latest checkpoint initialises the backbone."""
    path = Path(init_from)
    if not path.is_absolute():
        path = recipe.base_dir() / path
    if path.suffix == ".toml":
        if run_recipe is None or out_dir is None:
            raise RecipeError(f"backbone.init_from = {init_from!r} names a recipe; run it first and point at its run directory")
        return run_recipe(path, out_dir / "pretrain", recipe.train.seed)
    if not path.exists():
        raise CheckpointError(f"backbone.init_from: {path} does not exist")
    return path


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
