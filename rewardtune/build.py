"""Recipe -> objects: data, backbone (with pretrained weights), value, reward, algorithm, evaluator.

`build_experiment` constructs everything a `Trainer` needs from a validated `Recipe`. A backbone's `init_from`
names where its starting weights come from: a run directory (its latest checkpoint) or another recipe (.toml), which
is run first into `<out_dir>/pretrain` (and reused when it already finished there). A [distill] table's `teacher`
is resolved the same way (a recipe runs into `<out_dir>/teacher`) and loaded frozen (`load_teacher`).

Paths: a recipe (.toml) is looked up next to the recipe that names it; a run directory relative to the working
directory first, then next to the recipe.

Everything a recipe asks for is checked here, before training starts: what each factory returns against its kind's
contract (`registry.Registry.check_built`), whether the evaluator can evaluate this data with these [eval] settings
(`make_evaluator`), value guidance (`value_guide`) and the `eval.keep_best` metric. A plugin that fails in its own
code is named by `plugin_failures.PluginOwners`, which the experiment hands on to the trainer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from rewardtune import checkpoint as ckpt
from rewardtune.condition_supply import build_condition_supply, check_metadata
from rewardtune.errors import CheckpointError, RecipeError, RewardtuneError
from rewardtune.plugin_failures import PluginOwners
from rewardtune.recipe import PluginSpec, Recipe, parse_recipe, read_toml
from rewardtune.registry import REGISTRIES, context_parameters
from rewardtune.rewards.base import reward_shares_value
from rewardtune.tables import PluginTable
from rewardtune.trainer import EvalConfig, SilentReporter
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
    plugin_owners: PluginOwners = field(default_factory=PluginOwners)  # who failed, when plugin code raises
    conditions: object = None  # a conditional run's condition_supply.ConditionSupply (None: unconditional)


def call_factory(section: str, spec: PluginSpec, context: dict, owners: PluginOwners | None = None) -> object:
    """Build the object of the plugin table `[section]`, and check it against the kind's contract.

    A factory's ValueError or TypeError is a RecipeError (the factory rejects its options); any other exception
    raised in a plugin's own code is a PluginError naming the plugin (`owners`, which learns this table's code).
    """
    owners = owners if owners is not None else PluginOwners()
    factory = REGISTRIES[section].get(spec.kind)
    label = f"[{section}] kind {spec.kind!r}"
    owners.add_code_of(factory, label)
    for nested_label, module in nested_code(section, spec.options):
        owners.add(module, nested_label)
    missing = [name for name in context_parameters(factory) if name not in context]
    if missing:
        raise RecipeError(f"{label} asks for {missing[0]!r}, which is not built before [{section}]")
    args = [context[name] for name in context_parameters(factory)]
    try:
        built = factory(*args, **spec.options)
    except RewardtuneError:
        raise
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{label}: {err}") from None
    except Exception as err:  # a plugin's factory may raise anything (a missing weights file, ...)
        failure = owners.failure(err, "while the recipe was built")
        if failure is None:
            raise
        raise failure from err
    REGISTRIES[section].check_built(built, label)
    owners.add_code_of(built, label)
    return built


CODE_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # "package.module:factory"


def nested_code(section: str, options: dict) -> Iterator[tuple[str, str]]:
    """(label, module) of the code a table's options name: nested plugin tables (the terms of a composite, labelled
    "[[reward.terms]] #2 kind 'jpeg'") and "package.module:factory" strings (an EDM `network`)."""
    values = dict(options)
    config = values.pop("config", None)
    if dataclasses.is_dataclass(config):
        values.update({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    for key, value in values.items():
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            if isinstance(item, PluginTable):
                where = f"[[{section}.{key}]] #{i + 1}" if isinstance(value, (list, tuple)) else f"[{section}] {key}"
                yield f"{where} kind {item.kind!r}", getattr(item.factory, "__module__", "")
            elif isinstance(item, str) and CODE_PATH.fullmatch(item):
                yield f"[{section}] {key} {item!r}", item.partition(":")[0]


def build_experiment(
    recipe: Recipe, out_dir: Path | None = None, run_recipe: Callable | None = None, reporter=None
) -> Experiment:
    """Construct the objects of a recipe. `run_recipe(recipe_path, out_dir, seed)` runs a pretraining recipe;
    `reporter` (a progress Reporter) is handed to factories that ask for it (feature extraction, pretraining)."""
    teacher = None
    if recipe.distill is not None:  # first: building the teacher seeds torch with the teacher's seed
        teacher_dir = resolve_run_path(recipe.distill.teacher, "distill.teacher", recipe, out_dir, run_recipe, "teacher")
        teacher = load_teacher(teacher_dir)
    torch.manual_seed(recipe.train.seed)  # identical initial weights on every process
    plugins, owners = recipe.plugins, PluginOwners()
    reporter = reporter if reporter is not None else SilentReporter()
    data = call_factory("data", plugins["data"], {"reporter": reporter}, owners)
    evaluator = make_evaluator(data, recipe, owners)  # before any pretraining: a bad [eval] fails fast
    supply = build_condition_supply(recipe.conditions, data, recipe.base_dir())
    context: dict = {
        "sample_shape": tuple(data.sample_shape),
        "data": data,
        "reporter": reporter,
        "teacher": teacher,
        "conditioning": None if supply is None else supply.conditioning,
    }
    backbone = call_factory("backbone", plugins["backbone"], context, owners)
    context.update(backbone=backbone, num_steps=backbone.num_steps, value=None, reward=None)
    init_from = plugins["backbone"].extra.get("init_from")
    if init_from:
        path = resolve_run_path(init_from, "backbone.init_from", recipe, out_dir, run_recipe, "pretrain")
        load_initial_weights(backbone, path)
    elif teacher is not None and recipe.distill.init_from_teacher:
        copy_teacher_network(teacher, backbone)
    if "value" in plugins:  # the value sees the chain's states: the backbone's (latents for a latent backbone)
        states = {**context, "sample_shape": tuple(backbone.sample_shape)}
        context["value"] = call_factory("value", plugins["value"], states, owners)
    if "reward" in plugins:  # rewards see the samples: `output(x_T)`, the data's shape
        context["reward"] = call_factory("reward", plugins["reward"], context, owners)
        check_shared_energy(context["reward"], context["value"], backbone, data)
    if "prior" in plugins:  # after the reward: a prior may start from the data through the reward's networks
        set_prior(backbone, call_factory("prior", plugins["prior"], context, owners))
    algorithm = call_factory("algorithm", plugins["algorithm"], context, owners)
    check_data_needed(data, context["reward"], algorithm)
    check_reward_trainer(context["reward"], algorithm, plugins)
    if supply is not None:
        check_metadata(supply, context["reward"])
        check_conditional(plugins, context, algorithm)
        check_groups(algorithm, supply, recipe.train.batch_size)
        check_data_conditions(data, context["reward"], algorithm)
    if recipe.eval.guidance_scale:
        value_guide(algorithm, recipe.eval.guidance_scale, "eval.guidance_scale")
    with owners.attributing("while the recipe was built"):  # keep_best may probe the reward's evaluation_metrics
        if supply is None:  # a conditional run's metric names depend on its conditions: checked at step 0 instead
            check_keep_best(recipe.eval, evaluator, context["reward"])
    return Experiment(recipe, data, backbone, context["value"], context["reward"], algorithm, evaluator, owners, supply)


def set_prior(backbone, prior) -> None:
    """The recipe's [prior] replaces the backbone's pi(x_0); a draw must have the policy's state shape."""
    draw = prior.sample(2, tuple(backbone.sample_shape), torch.Generator().manual_seed(0), "cpu")
    if tuple(draw.shape) != (2, *backbone.sample_shape):
        raise RecipeError(
            f"[prior] draws x_0 of shape {tuple(draw.shape[1:])}, but the backbone's states are {tuple(backbone.sample_shape)}"
        )
    backbone.prior = prior.to(backbone.device)


def check_shared_energy(reward, value, backbone, data) -> None:
    """An energy that is the value at the terminal time, E(x) = V(x, T), scores the chain's states; it is trained on
    data, so the states must be data: not a latent backbone's."""
    if reward is None or value is None or not reward_shares_value(reward, value):
        return
    if tuple(backbone.sample_shape) != tuple(data.sample_shape):
        raise RecipeError(
            f"[reward] share_with_value = true: the value sees the backbone's states {tuple(backbone.sample_shape)}, "
            f"but the energy is trained on data {tuple(data.sample_shape)} (a latent backbone); set "
            "share_with_value = false for an energy on the decoded samples"
        )


def check_data_needed(data, reward, algorithm) -> None:
    """Data `none` has no data: a learning reward (trained on data against samples) and an algorithm that trains on
    data (DDPM or flow-matching pretraining: no rollout) cannot run on it."""
    if not hasattr(data, "images") or data.images is not None:
        return
    if reward is not None and getattr(reward, "learns", False):
        raise RecipeError("[reward] learns from data against the samples, but [data] kind = \"none\" has no data")
    if not algorithm.needs_rollout:
        raise RecipeError(f"[algorithm] {type(algorithm).__name__} trains on data, but [data] kind = \"none\" has none")


def check_reward_trainer(reward, algorithm, plugins: dict) -> None:
    """A learning reward that no rollout update trains (`trained_by_algorithm`, the `time_energy` of DDAEBM) needs an
    algorithm that steps it (`trains_reward`); with any other it would never learn."""
    if getattr(reward, "trained_by_algorithm", False) and not getattr(algorithm, "trains_reward", False):
        raise RecipeError(
            f"[reward] kind {plugins['reward'].kind!r} is trained by its algorithm (teacher-forced pairs), which "
            f"[algorithm] kind {plugins['algorithm'].kind!r} does not do: use [algorithm] kind = \"ddaebm\""
        )


def check_data_conditions(data, reward, algorithm) -> None:
    """A conditional energy (data against samples, each under its own condition) and data-driven training (DDPM
    pretraining, no rollout) need every data point's condition: the data must give them (`sample_conditioned`)."""
    needs = (reward is not None and getattr(reward, "learns", False)) or not algorithm.needs_rollout
    if not needs:
        return
    try:
        data.sample_conditioned(2, torch.Generator().manual_seed(0))
    except AttributeError:
        raise RecipeError(
            f"[data] {type(data).__name__} gives no conditions with its samples, which a conditional "
            f"{'energy' if getattr(reward, 'learns', False) else 'pretraining'} needs (sample_conditioned)"
        ) from None
    except RewardtuneError as err:
        raise RecipeError(f"[data]: {err}") from None


def check_groups(algorithm, supply, batch_size: int) -> None:
    """An algorithm that draws its rollouts in groups per condition (`rollout_group_size`, GRPO) needs a batch that
    is a whole number of groups and a source it may draw from."""
    group = int(getattr(algorithm, "rollout_group_size", 1))
    if group <= 1:
        return
    if batch_size % group:
        raise RecipeError(f"train.batch_size = {batch_size} is not a multiple of algorithm.group_size = {group}")
    if getattr(supply.source, "from_data", False):
        raise RecipeError("algorithm.group_size: group advantages draw their own conditions; set [conditions] "
                          "distribution = \"uniform\" (not \"data\")")


def check_conditional(plugins: dict, context: dict, algorithm) -> None:
    """In a conditional recipe, the backbone, the value and a learning reward must take the condition (their factory
    asks for `conditioning`), and the algorithm must declare `conditional = True`: a table that would silently
    ignore the condition is a RecipeError."""
    needed = ["backbone", *(["value"] if "value" in plugins else [])]
    reward = context.get("reward")
    if reward is not None and getattr(reward, "learns", False):
        needed.append("reward")
    for section in needed:
        factory = REGISTRIES[section].get(plugins[section].kind)
        if "conditioning" not in context_parameters(factory):
            raise RecipeError(
                f"[{section}] kind {plugins[section].kind!r} does not take a condition, but the recipe has [conditions] "
                "(its factory has no `conditioning` parameter)"
            )
    if not getattr(algorithm, "conditional", False):
        raise RecipeError(
            f"[algorithm] kind {plugins['algorithm'].kind!r} does not train conditional samplers (it does not declare "
            "conditional = True); drop [conditions]"
        )


def value_guide(algorithm, scale: float, option: str):
    """`algorithm.guide(scale)`, the value guidance of Sec. 5.2, or a RecipeError naming `option` when the algorithm
    has no value function to guide with."""
    guide = getattr(algorithm, "guide", None)
    if guide is None:
        raise RecipeError(f"{option} = {scale}: algorithm {type(algorithm).__name__} has no value guidance (guide)")
    try:
        return guide(scale)
    except RecipeError as err:
        raise RecipeError(f"{option} = {scale}: {err}") from None


def check_keep_best(cfg: EvalConfig, evaluator, reward) -> None:
    """`eval.keep_best` must name a metric the evaluator reports for this reward."""
    if cfg.keep_best:
        names = evaluator.metric_names(reward)
        if cfg.keep_best not in names:
            raise RecipeError(f"eval.keep_best = {cfg.keep_best!r} is not a metric of this run ({', '.join(sorted(names))})")


def make_evaluator(data, recipe: Recipe, owners: PluginOwners | None = None):
    """Data that declare `make_evaluator(eval_config)` get theirs (`anomaly_features`: AUROCs); otherwise images
    (C, H, W) get the FID/precision/recall evaluator and vectors (D,) the sliced-Wasserstein one. Settings
    the evaluator cannot honour for this data are a RecipeError here, before training."""
    cfg, shape = recipe.eval, tuple(data.sample_shape)
    if hasattr(data, "make_evaluator"):  # data that declare their own evaluation (anomaly detection)
        return data.make_evaluator(cfg)
    if len(shape) == 3:
        return make_image_evaluator(data, cfg, owners or PluginOwners())
    from rewardtune.evaluation import ToyEvaluator

    check_vector_evaluation(shape, cfg)
    return ToyEvaluator(data, num_samples=cfg.num_samples, repeats=cfg.repeats)


def make_image_evaluator(data, cfg: EvalConfig, owners: PluginOwners):
    """The ImageEvaluator, after checking that its feature extractor takes this data's images and that there are
    enough samples and reference images for the Fréchet distance and precision/recall."""
    from rewardtune.image_evaluation import ImageEvaluator
    from rewardtune.metrics.fid import check_feature_extractor
    from rewardtune.metrics.precision_recall import NEIGHBOURS

    if cfg.repeats != EvalConfig.repeats:
        raise RecipeError(
            f"eval.repeats = {cfg.repeats} applies to vector data (sliced Wasserstein); images are evaluated once on "
            "eval.num_samples samples: drop eval.repeats"
        )
    images = getattr(data, "images", None)
    if images is None and hasattr(data, "images"):  # data `none`: the reward's metrics only, nothing to compare with
        for key in ("feature_extractor", "reference_samples"):
            if getattr(cfg, key) != getattr(EvalConfig, key):
                raise RecipeError(f"eval.{key} sets the Fréchet distance's features or reference, but [data] kind = "
                                  "\"none\" has no images to compare with; drop it")
        return ImageEvaluator(data, num_samples=cfg.num_samples, feature_extractor="", reference_samples=0)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise RecipeError(
            f"image evaluation computes its reference features from the data's .images [N, C, H, W]; data of type "
            f"{type(data).__name__} has none"
        )
    if ":" in cfg.feature_extractor:
        owners.add(cfg.feature_extractor.partition(":")[0], f"[eval] feature_extractor {cfg.feature_extractor!r}")
    extractor = check_feature_extractor(cfg.feature_extractor, tuple(data.sample_shape))
    needed = NEIGHBOURS + 1  # a point and its k nearest others
    reference = images.shape[0] if cfg.reference_samples == 0 else min(cfg.reference_samples, images.shape[0])
    for what, count in (("samples (eval.num_samples)", cfg.num_samples), ("reference images (the data's)", reference)):
        if count < needed:
            raise RecipeError(
                f"precision/recall needs at least {needed} {what}, got {count}: each point's ball reaches its "
                f"k-th nearest neighbour (k = {NEIGHBOURS})"
            )
    return ImageEvaluator(
        data, num_samples=cfg.num_samples, feature_extractor=cfg.feature_extractor,
        reference_samples=cfg.reference_samples, _extractor=extractor,
    )


def check_vector_evaluation(shape: tuple[int, ...], cfg: EvalConfig) -> None:
    """The sliced-Wasserstein evaluator takes vectors; its picture needs at least two coordinates. The image
    settings do not apply."""
    for key in ("feature_extractor", "reference_samples"):
        if getattr(cfg, key) != getattr(EvalConfig, key):
            raise RecipeError(f"eval.{key} applies to images (C, H, W); this data gives samples of shape {shape}")
    if len(shape) != 1:
        raise RecipeError(f"evaluation takes vectors (D,) or images (C, H, W); this data gives samples of shape {shape}")
    if cfg.plot and shape[0] < 2:
        raise RecipeError(f"eval.plot draws the first two coordinates, but samples have shape {shape}: set eval.plot = false")


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


def checkpoint_replaced(raw: dict) -> dict:
    """A copy of the recipe dict `raw` in which every plugin table's options that a checkpoint makes moot are set as
    its factory declares (`factory.checkpoint_replaces`, {option: value}; e.g. the autoencoder energy's
    `pretrain_steps` = 0: its weights come from the checkpoint, so pretraining them first is wasted time). Build with
    it only when a checkpoint will load over every object (resume, eval, sample); the run keeps the recipe as written.
    """
    import copy

    raw = copy.deepcopy(raw)
    for section, registry in REGISTRIES.items():
        table = raw.get(section)
        if not isinstance(table, dict) or not isinstance(table.get("kind"), str):
            continue
        try:
            factory = registry.get(table["kind"])
        except RewardtuneError:  # an unknown kind: the recipe's own check says so
            continue
        table.update(getattr(factory, "checkpoint_replaces", {}))
    return raw


def with_seed(recipe: Recipe, seed: int) -> Recipe:
    train = replace(recipe.train, seed=seed)
    resolved = {**recipe.resolved, "train": {**recipe.resolved["train"], "seed": seed}}
    return replace(recipe, train=train, resolved=resolved)
