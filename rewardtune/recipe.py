"""Recipes: TOML -> validated, typed configuration.

A recipe has one table per object. Plugin tables (`[data]`, `[backbone]`, `[value]`, `[reward]`, `[algorithm]`)
name their factory with `kind`; every other key must be an option of that factory, with the factory's type. Fixed
tables (`[run]`, `[train]`, `[eval]`) map onto dataclasses. Unknown tables and keys are errors with a "did you mean";
`--set table.key=value` overrides go through the same checks. `resolve` returns the full recipe with every default
filled in, which is what a run directory stores as recipe.toml.

A setting that the rest of the recipe makes ineffective is an error (`check_settings_apply`: `best_mode` without
`keep_best`, a [distill] teacher no plugin uses, ...); one that may be meant for a short trial run is a warning
(`recipe_warnings`, which `run_recipe` passes to the reporter).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rewardtune.errors import RecipeError
from rewardtune.registry import CONTEXT_NAMES, REGISTRIES, context_parameters
from rewardtune.tables import PluginTable
from rewardtune.trainer import EvalConfig, TrainConfig


@dataclass(frozen=True)
class RunConfig:
    """The [run] section."""

    name: str = "run"  # the run's name (default output directory: runs/<name>)
    description: str = ""  # free text, kept in the resolved recipe


@dataclass(frozen=True)
class DistillSection:
    """The optional [distill] section: the teacher of a distillation recipe (docs/distillation.md)."""

    teacher: str = ""  # the tuned T-step sampler: a run directory, or a recipe (.toml) run first into <out>/teacher
    init_from_teacher: bool = True  # start the student's network from the teacher's (same architecture needed)


PLUGIN_SECTIONS = ("data", "backbone", "value", "reward", "algorithm", "prior")
REQUIRED_SECTIONS = ("data", "backbone", "algorithm")
FIXED_SECTIONS: dict[str, type] = {"run": RunConfig, "train": TrainConfig, "eval": EvalConfig}
OPTIONAL_SECTIONS: dict[str, type] = {"distill": DistillSection}  # in the resolved recipe only when given
RAW_SECTIONS = ("conditions",)  # tables validated when built (condition_sources.py), kept as written
EXTRA_KEYS = {"backbone": {"init_from": str}}  # keys a plugin table takes besides its factory's options


@dataclass(frozen=True)
class PluginSpec:
    kind: str
    options: dict[str, Any]  # validated factory options (the `config` dataclass instance under "config")
    extra: dict[str, Any] = field(default_factory=dict)  # EXTRA_KEYS values


@dataclass(frozen=True)
class Recipe:
    path: Path | None
    run: RunConfig
    train: TrainConfig
    eval: EvalConfig
    plugins: dict[str, PluginSpec]
    resolved: dict[str, Any]  # the full recipe with defaults, TOML-serialisable
    distill: DistillSection | None = None
    conditions: dict[str, Any] | None = None  # the [conditions] table (None: an unconditional recipe)

    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()


# ---- loading ------------------------------------------------------------------------------------------------------
def read_toml(path: Path) -> dict:
    """A TOML file as a dict; malformed or binary content is a one-line RecipeError."""
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: malformed TOML: {err}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    raw = read_toml(path)
    for item in overrides or []:
        apply_override(raw, item)
    return parse_recipe(raw, path)


def apply_override(raw: dict, item: str) -> None:
    """Apply `table.key=value`, or `table.key.subkey=value` for a key of a nested table such as
    `conditions.text_encoder.model` (value in TOML syntax; a bare word is taken as a string)."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise RecipeError(f"--set {item!r}: expected table.key=value, e.g. train.steps=100")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    table, *inner, name = parts
    known = [*FIXED_SECTIONS, *OPTIONAL_SECTIONS, *RAW_SECTIONS, *PLUGIN_SECTIONS]
    if table not in known:
        raise RecipeError(f"--set {item!r}: unknown table [{table}]{suggest(table, known)}")
    section = raw.setdefault(table, {})
    if not isinstance(section, dict):
        raise RecipeError(f"--set {item!r}: [{table}] is not a table")
    for depth, sub in enumerate(inner):  # nested tables: created when absent, refused when another value is there
        section = section.setdefault(sub, {})
        if not isinstance(section, dict):
            raise RecipeError(f"--set {item!r}: {'.'.join([table, *inner[: depth + 1]])} is not a table")
    section[name] = value


def parse_recipe(raw: dict, path: Path | None = None) -> Recipe:
    where = str(path) if path is not None else "recipe"
    known = [*FIXED_SECTIONS, *OPTIONAL_SECTIONS, *RAW_SECTIONS, *PLUGIN_SECTIONS]
    for name, value in raw.items():
        if name not in known:
            raise RecipeError(f"{where}: unknown table [{name}]{suggest(name, known)}")
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: [{name}] must be a table, got {type(value).__name__}")
    for name in REQUIRED_SECTIONS:
        if name not in raw:
            raise RecipeError(f"{where}: missing table [{name}]")
    fixed = {name: build_dataclass(cls, raw.get(name, {}), f"{where}: [{name}]") for name, cls in FIXED_SECTIONS.items()}
    optional = {
        name: build_dataclass(cls, raw[name], f"{where}: [{name}]") for name, cls in OPTIONAL_SECTIONS.items() if name in raw
    }
    distill = optional.get("distill")
    if distill is not None and not distill.teacher:
        raise RecipeError(f"{where}: [distill] needs a teacher (a run directory or a recipe .toml)")
    plugins = {name: parse_plugin(name, raw[name], where) for name in PLUGIN_SECTIONS if name in raw}
    check_settings_apply(fixed["train"], fixed["eval"], distill, plugins, where)
    resolved = {name: dataclass_to_dict(obj) for name, obj in {**fixed, **optional}.items()}
    for name, spec in plugins.items():
        resolved[name] = resolved_table(spec.kind, spec.options, spec.extra)
    conditions = raw.get("conditions")
    if conditions is not None:
        conditions = with_absolute_paths(conditions, path.parent if path is not None else Path.cwd())
        resolved["conditions"] = conditions
    return Recipe(path, fixed["run"], fixed["train"], fixed["eval"], plugins, resolved, distill, conditions)


CONDITION_PATH_KEYS = ("path", "held_out_path")  # [conditions] keys naming files, relative to the recipe


def with_absolute_paths(table: dict, base_dir: Path) -> dict:
    """The [conditions] table with its prompt files made absolute (relative to the recipe's folder), so the run
    directory's recipe.toml names the files the run read, wherever it is loaded from."""
    table = dict(table)
    for key in CONDITION_PATH_KEYS:
        if isinstance(table.get(key), str) and table[key] and not Path(table[key]).is_absolute():
            table[key] = str((base_dir / table[key]).resolve())
    return table


def check_settings_apply(
    train: TrainConfig, evaluation: EvalConfig, distill: DistillSection | None, plugins: dict[str, PluginSpec], where: str
) -> None:
    """Refuse settings that the rest of the recipe would silently ignore."""
    if evaluation.best_mode != EvalConfig.best_mode and not evaluation.keep_best:
        raise RecipeError(f"{where}: [eval] best_mode applies to keep_best, which is not set")
    if evaluation.keep_best and not train.eval_every:
        raise RecipeError(
            f"{where}: [eval] keep_best = {evaluation.keep_best!r} keeps the best of the periodic evaluations, but "
            "train.eval_every = 0 makes none: set train.eval_every"
        )
    if train.lr_final_fraction != TrainConfig.lr_final_fraction and train.lr_schedule != "cosine":
        raise RecipeError(f"{where}: [train] lr_final_fraction applies to lr_schedule = 'cosine', not {train.lr_schedule!r}")
    if distill is not None and not any("teacher" in context_parameters(f) for f in plugin_factories(plugins)):
        raise RecipeError(
            f"{where}: [distill] names a teacher (or --teacher was given), but no plugin of this recipe uses one "
            f"(algorithm {plugins['algorithm'].kind!r}); a distillation recipe has algorithm 'distill' "
            "(docs/distillation.md)"
        )


def plugin_factories(plugins: dict[str, PluginSpec]) -> list:
    """The factories of a recipe's plugin tables, and of the tables nested in their options."""
    factories = []
    for section, spec in plugins.items():
        factories.append(REGISTRIES[section].get(spec.kind))
        for value in spec.options.values():
            items = value if isinstance(value, (list, tuple)) else [value]
            factories += [item.factory for item in items if isinstance(item, PluginTable)]
    return factories


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Settings that leave part of a run idle, worth a warning line (they may be meant, in a short trial run)."""
    warnings = []
    steps, algorithm = recipe.train.steps, recipe.plugins["algorithm"]
    warmup, regression = plugin_option(algorithm, "value_warmup") or 0, plugin_option(algorithm, "regression_steps") or 0
    if warmup and steps and regression + warmup >= steps:
        before = f"regression_steps + value_warmup = {regression} + {warmup}" if regression else f"value_warmup = {warmup}"
        warnings.append(
            f"algorithm.{before} >= train.steps = {steps}: the policy takes no improvement step in this run "
            "(only the value, and a learning reward, are trained)"
        )
    if recipe.eval.keep_best and recipe.train.eval_every >= steps > 0:
        warnings.append(
            f"eval.keep_best: train.eval_every = {recipe.train.eval_every} >= train.steps = {steps}, so no periodic "
            "evaluation runs and no best checkpoint is kept"
        )
    return warnings


def plugin_option(spec: PluginSpec, name: str) -> Any:
    """A plugin table's option, from its `config` dataclass or its keyword options (None when it has none)."""
    config = spec.options.get("config")
    return getattr(config, name, None) if dataclasses.is_dataclass(config) else spec.options.get(name)


def resolved_table(kind: str, options: dict, extra: dict) -> dict:
    """A plugin table as the resolved recipe writes it: kind, extra keys, then every option (defaults included)."""
    options = dict(options)
    if "config" in options and dataclasses.is_dataclass(options["config"]):
        options = dataclass_to_dict(options.pop("config"))
    return {"kind": kind, **drop_none(extra), **drop_none(options)}


def parse_plugin(
    section: str, table: dict, where: str, *, at: str | None = None, extras_spec: dict[str, type] | None = None
) -> PluginSpec:
    """Validate a plugin table of `section`. `at` (default "<where>: [<section>]") prefixes the errors, and
    `extras_spec` (default EXTRA_KEYS[section]) names the keys taken besides the factory's options."""
    at = f"{where}: [{section}]" if at is None else at
    extras_spec = EXTRA_KEYS.get(section, {}) if extras_spec is None else extras_spec
    if "kind" not in table:
        raise RecipeError(f"{at} needs a 'kind' (one of: {', '.join(REGISTRIES[section].names())})")
    kind = table["kind"]
    if not isinstance(kind, str):
        raise RecipeError(f"{at} kind must be a string, got {kind!r}")
    factory = REGISTRIES[section].get(kind)
    params = factory_options(factory)
    options, extra = {}, {}
    for key, value in table.items():
        if key == "kind":
            continue
        if key in extras_spec:
            extra[key] = check_type(value, extras_spec[key], f"{at} {key}")
            continue
        if key not in params:
            allowed = [*params, *extras_spec]
            raise RecipeError(f"{at} unknown key {key!r} for kind {kind!r}{suggest(key, allowed)}")
        options[key] = check_type(value, params[key][0], f"{at} {key}")
        validate_range(key, options[key], at)
    config_class = getattr(factory, "_config_class", None)
    if config_class is not None:
        options = {"config": construct(config_class, options, at)}
    else:
        options = {**{k: d for k, (_, d) in params.items() if d is not inspect.Parameter.empty}, **options}
        missing = [k for k, (_, d) in params.items() if d is inspect.Parameter.empty and k not in options]
        if missing:
            raise RecipeError(f"{at} kind {kind!r} needs {', '.join(missing)}")
    return PluginSpec(kind, options, extra)


def factory_options(factory) -> dict[str, tuple[Any, Any]]:
    """{option: (type, default)} of a factory: its keyword-only parameters, or the fields of its `config` dataclass."""
    try:
        sig = inspect.signature(factory)
        hints = typing.get_type_hints(factory)
    except (TypeError, ValueError, NameError) as err:
        raise RecipeError(f"cannot read the options of {factory!r}: {err}") from None
    kw = [p for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]
    if len(kw) == 1 and kw[0].name == "config" and dataclasses.is_dataclass(hints.get("config")):
        cls = hints["config"]
        factory._config_class = cls  # remembered for parse_plugin
        field_hints = typing.get_type_hints(cls)
        return {f.name: (field_hints[f.name], f.default) for f in dataclasses.fields(cls)}
    for p in sig.parameters.values():
        if p.kind is p.POSITIONAL_ONLY and p.name not in CONTEXT_NAMES:
            raise RecipeError(f"factory {factory!r} has an unknown context parameter {p.name!r}")
    return {p.name: (hints.get(p.name, Any), p.default) for p in kw}


# ---- types --------------------------------------------------------------------------------------------------------
def check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` converted to `annotation` (int -> float, list -> tuple) or raise RecipeError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for option in non_none:
            try:
                return check_type(value, option, where)
            except RecipeError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else RecipeError(f"{where}: {value!r} is not {describe(annotation)}")
    if origin is Literal:
        if value in args:
            return value
        raise RecipeError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}{suggest(str(value), [str(a) for a in args])}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif isinstance(annotation, type) and issubclass(annotation, PluginTable):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):  # a nested plugin table: validated like a top-level one
            spec = parse_plugin(annotation.section, value, where, at=where, extras_spec=annotation.extra_keys)
            factory = REGISTRIES[annotation.section].get(spec.kind)
            return annotation(spec.kind, factory, spec.options, {**annotation.extra_defaults, **spec.extra})
    elif annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif origin in (tuple, list):
        if isinstance(value, list):
            inner = args[0] if args else Any
            items = [check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    else:
        return value
    raise RecipeError(f"{where}: expected {describe(annotation)}, got {value!r} ({type(value).__name__})")


def describe(annotation: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and issubclass(annotation, PluginTable):
        return f"a {annotation.section} table (with a 'kind')"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):  # e.g. "an integer or 'auto'"
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    return str(annotation).replace("typing.", "")


def build_dataclass(cls: type, table: dict, where: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise RecipeError(f"{where} unknown key {key!r}{suggest(key, sorted(fields))}")
        values[key] = check_type(value, hints[key], f"{where} {key}")
    return construct(cls, values, where)


def construct(cls: type, values: dict, where: str):
    try:
        obj = cls(**values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None
    validate_ranges(obj, where)
    return obj


POSITIVE = {"batch_size", "num_samples", "repeats", "log_every", "checkpoint_every", "keep_checkpoints", "num_steps",
            "hidden", "depth", "num_train_steps", "policy_batch"}
NON_NEGATIVE = {"steps", "eval_every", "value_warmup", "gamma", "time_dim", "reference_samples", "cpu_threads", "knn_entropy"}
UNIT_INTERVAL = {"avr_alpha", "ema_decay", "lr_final_fraction"}


def validate_ranges(obj, where: str) -> None:
    """Sizes and counts must be positive; rates in [0, 1]; learning rates and temperatures non-negative."""
    for f in dataclasses.fields(obj):
        validate_range(f.name, getattr(obj, f.name), where)


def validate_range(name: str, value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if name in POSITIVE and value <= 0:
        raise RecipeError(f"{where} {name} must be positive, got {value}")
    if (name in NON_NEGATIVE or name.endswith("lr") or name.startswith("tau")) and value < 0:
        raise RecipeError(f"{where} {name} must be >= 0, got {value}")
    if name in UNIT_INTERVAL and not 0 <= value <= 1:
        raise RecipeError(f"{where} {name} must be in [0, 1], got {value}")


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def dataclass_to_dict(obj) -> dict:
    return drop_none(dataclasses.asdict(obj))


def drop_none(d: dict) -> dict:
    """TOML has no null: options left at None are omitted (they mean "default")."""
    return {k: plain(v) for k, v in d.items() if v is not None}


def plain(value: Any) -> Any:
    """A TOML-serialisable form of an option: tuples become lists, nested plugin tables become tables."""
    if isinstance(value, PluginTable):
        return resolved_table(value.kind, value.options, value.extra)
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def recipe_to_toml(recipe: Recipe) -> str:
    import tomli_w

    return tomli_w.dumps(recipe.resolved)
