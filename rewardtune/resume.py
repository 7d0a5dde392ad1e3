"""What `--resume` does with settings that changed since the run's checkpoint: apply each one, or refuse it.

A resumed run is built from the new recipe and then loads the checkpoint into those objects. A changed setting is
therefore in force after the load unless the checkpoint restores a value of its own over it, or was made for the
old value (weights of another architecture, random streams of another seed). `RESUME_POLICY` declares, in this one
place, which settings a resume applies and which it refuses; a refusal is one line naming the setting, raised
before anything in the run directory changes. A setting not in the table is refused, and the message says so.

Learning rates are "applied" because `GradStep.load_state_dict` keeps the recipe's hyperparameters over the ones
stored with the Adam state. docs/reliability.md ("Changing settings on --resume") is the table for users.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rewardtune.errors import RecipeError

UNSET = "<unset>"  # a key absent from one side (TOML has no null: an option left at None is absent)


@dataclass(frozen=True)
class Rule:
    """What a resume does with one changed setting.

    Args:
        applied: the resumed run uses the new value (else the resume is refused).
        why: how the new value takes effect, or why it cannot.
        kinds: the plugin kinds the rule is about (None: every kind, or a fixed table); another kind's key of the
            same name is not covered and so refused.
        refuse_if: for an applied setting, `(old, new, recipe) -> reason or None`: the changes it still refuses.
        restarts_best: the change makes metric values incomparable with the kept best one, so the keep-best record
            starts over.
    """

    applied: bool
    why: str
    kinds: tuple[str, ...] | None = None
    refuse_if: Callable[[Any, Any, dict], str | None] | None = None
    restarts_best: bool = False


def applied(why: str, **kwargs) -> Rule:
    return Rule(True, why, **kwargs)


def refused(why: str, **kwargs) -> Rule:
    return Rule(False, why, **kwargs)


def switches_ema(old: Any, new: Any, recipe: dict) -> str | None:
    if (old in (UNSET, 0, 0.0)) != (new in (UNSET, 0, 0.0)):
        return "switching the EMA on or off changes which weights the checkpoint holds and evaluation uses"
    return None


def switches_distill_reference(old: Any, new: Any, recipe: dict) -> str | None:
    if recipe.get("algorithm", {}).get("kind") == "distill" and (old in (UNSET, 0, 0.0)) != (new in (UNSET, 0, 0.0)):
        return "a distillation checkpoints its KL reference (the regressed student) only while kl_weight > 0"
    return None


ALGORITHMS = ("dxdp", "policy_gradient", "distill", "ddpm")
VALUES = ("time_mlp", "resnet")
LR = "re-applied to the optimiser after its Adam state loads"
EVERY_STEP = "read at every step"
BUILT = "the algorithm is built from the new recipe; its state (s_t^2, iteration count) continues from the checkpoint"
METRIC = "the evaluator is built from the new recipe; metric values before and after the change are not comparable"

RESUME_POLICY: dict[str, Rule] = {
    # [run]: labels
    "run.name": applied("a label"),
    "run.description": applied("a label"),
    # [train]
    "train.steps": applied("the loop runs to the new count; a cosine lr_schedule stretches to it (the lr can jump)"),
    "train.batch_size": applied(EVERY_STEP),
    "train.log_every": applied(EVERY_STEP),
    "train.eval_every": applied(EVERY_STEP),
    "train.checkpoint_every": applied(EVERY_STEP),
    "train.keep_checkpoints": applied("used when the next checkpoint prunes"),
    "train.lr_schedule": applied("the multiplier is a function of (step, steps), set at every step"),
    "train.lr_final_fraction": applied("the multiplier is a function of (step, steps), set at every step"),
    "train.cpu_threads": applied("set when the trainer starts"),
    "train.mixed_precision": applied("autocast is set when the trainer starts; fp16's loss scale starts afresh"),
    "train.skip_nonfinite": applied("set on the optimisers when the trainer starts; the count so far is kept"),
    "train.compile": applied("the networks are compiled (or not) when the trainer starts"),
    "train.channels_last": applied("the weights' memory order is set when the trainer starts (checkpoints are contiguous)"),
    "train.ema_decay": applied("the EMA continues from its checkpointed weights at the new rate", refuse_if=switches_ema),
    "train.seed": refused("the data and rollout random streams continue from the checkpoint's states, not from a seed"),
    # [eval]: the evaluator and the trainer's evaluation settings are built from the new recipe
    "eval.num_samples": applied(METRIC, restarts_best=True),
    "eval.repeats": applied(METRIC, restarts_best=True),
    "eval.guidance_scale": applied(METRIC, restarts_best=True),
    "eval.feature_extractor": applied(METRIC, restarts_best=True),
    "eval.reference_samples": applied(METRIC, restarts_best=True),
    "eval.keep_best": applied("the keep-best record starts over for the new metric", restarts_best=True),
    "eval.best_mode": applied("the keep-best record starts over in the new direction", restarts_best=True),
    "eval.plot": applied(EVERY_STEP),
    # [algorithm] of the built-in algorithms
    **{
        f"algorithm.{key}": applied(LR, kinds=ALGORITHMS)
        for key in ("sampler_lr", "sigma_lr", "regression_lr", "regression_sigma_lr", "lr")
    },
    **{f"algorithm.{key}": applied(EVERY_STEP, kinds=ALGORITHMS) for key in ("sampler_grad_clip", "grad_clip")},
    **{
        f"algorithm.{key}": applied(BUILT, kinds=ALGORITHMS)
        for key in (
            "tau_entropy", "tau_velocity", "per_dimension", "entropy_in_value", "velocity_in_value", "value_entropy",
            "time_cost", "linear_time_cost", "sigmoid_time_cost_scale", "sigmoid_time_cost_center", "td_mode", "avr",
            "avr_alpha", "policy_batch", "value_warmup", "terminal", "clip_range", "ppo_epochs", "minibatches",
            "normalize_advantages", "knn_entropy", "knn_k", "regression_steps", "teacher_noise", "restart_lr_schedule",
            "stat_buffer_size", "stat_min_count", "p_uncond",
        )
    },
    "algorithm.kl_weight": applied(
        "the KL reference is the starting policy, rebuilt from the starting weights", kinds=ALGORITHMS,
        refuse_if=switches_distill_reference,
    ),
    "algorithm.regression_sigma": refused("it sets sigma_s when the student is built; the checkpoint's sigma_s replaces it"),
    "algorithm.kind": refused("the checkpoint holds another algorithm's optimisers and state"),
    "algorithm.advantage": refused("the checkpoint's value baseline or per-condition statistics belong to the old one"),
    "algorithm.group_size": refused("groups per condition shape every batch's advantages; start a new run to change it"),
    # [value]
    "value.lr": applied(LR, kinds=VALUES),
    "value.grad_clip": applied(EVERY_STEP, kinds=VALUES),
    "value.*": refused("the checkpoint holds the value network of the old architecture"),
    # [reward]
    "reward.lr": applied(LR, kinds=("energy",)),
    "reward.grad_clip": applied(EVERY_STEP, kinds=("energy",)),
    "reward.gamma": applied("the energy's regulariser weight, read at every step", kinds=("energy",)),
    "reward.kind": refused("the checkpoint's value and sampler were trained for the old reward"),
    "reward.share_with_value": refused("the checkpoint holds the energy network of the old architecture"),
    "reward.hidden": refused("the checkpoint holds the energy network of the old architecture"),
    "reward.depth": refused("the checkpoint holds the energy network of the old architecture"),
    # [backbone], [data], [distill]
    "backbone.*": refused("the checkpoint holds the sampler of the old architecture, schedule and starting weights"),
    "data.*": refused("the training data (and the evaluation's reference) would change under the run"),
    "distill.*": refused("the teacher and the student's starting weights are the run's"),
    "conditions.*": refused("the networks were built and trained for the run's conditions (classes, prompts, text encoder)"),
}


@dataclass(frozen=True)
class Change:
    """One setting whose value differs between the saved and the new recipe."""

    key: str  # "table.key"
    old: Any
    new: Any


def recipe_changes(saved: dict, new: dict) -> list[Change]:
    """The settings of two resolved recipes (table -> key -> value) that differ, table by table and key by key."""
    changes = []
    for table in sorted(set(saved) | set(new)):
        old_table, new_table = saved.get(table, {}), new.get(table, {})
        for key in sorted(set(old_table) | set(new_table)):
            old, value = old_table.get(key, UNSET), new_table.get(key, UNSET)
            if old != value:
                changes.append(Change(f"{table}.{key}", old, value))
    return changes


def rule_for(key: str, recipe: dict) -> Rule | None:
    """The rule of `key` ("table.key") for the kind `recipe` gives its table; then the table's "table.*"; else None."""
    table = key.split(".", 1)[0]
    kind = recipe.get(table, {}).get("kind")
    rule = RESUME_POLICY.get(key)
    if rule is not None and (rule.kinds is None or kind in rule.kinds):
        return rule
    return RESUME_POLICY.get(f"{table}.*")


def refusal(change: Change, recipe: dict) -> str | None:
    """Why `change` cannot be resumed with (None: it is applied)."""
    rule = rule_for(change.key, recipe)
    if rule is None:
        return "it is not in the resume table (rewardtune/resume.py: RESUME_POLICY), so it is refused to be safe"
    if not rule.applied:
        return rule.why
    return rule.refuse_if(change.old, change.new, recipe) if rule.refuse_if is not None else None


def check_resume(saved: dict, new: dict, where: str) -> list[Change]:
    """The applied changes between the `saved` and `new` resolved recipes; a RecipeError naming the first refused
    setting (and counting the others) if any is refused."""
    changes = recipe_changes(saved, new)
    refusals = [(c, why) for c in changes if (why := refusal(c, new)) is not None]
    refusals.sort(key=lambda item: not item[0].key.endswith(".kind"))  # a changed kind explains its table's other keys
    if refusals:
        (first, why), others = refusals[0], [c.key for c, _ in refusals[1:]]
        also = f" (also refused: {', '.join(others)})" if others else ""
        raise RecipeError(
            f"{where}: --resume cannot change {first.key} ({short(first.old)} -> {short(first.new)}): {why}{also}; "
            "resume with the old value, or start a new run with another --out"
        )
    return changes


def restarts_best(changes: list[Change], recipe: dict) -> bool:
    """Whether an applied change makes the kept best metric value incomparable with new ones."""
    return any((rule := rule_for(c.key, recipe)) is not None and rule.restarts_best for c in changes)


def describe(changes: list[Change]) -> str:
    """`key old -> new, ...` for the resume message."""
    return ", ".join(f"{c.key} {short(c.old)} -> {short(c.new)}" for c in changes)


def short(value: Any, width: int = 40) -> str:
    text = value if value == UNSET else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
