"""Recipe parsing and the plugin registry."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from rewardtune.errors import PluginNotFoundError, RecipeError
from rewardtune.recipe import apply_override, load_recipe, parse_recipe, recipe_to_toml
from rewardtune.registry import REWARDS, Registry

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_parses_and_round_trips(path: Path):
    recipe = load_recipe(path)
    again = parse_recipe(tomllib.loads(recipe_to_toml(recipe)), path)
    assert again.resolved == recipe.resolved  # the resolved recipe is a fixed point of parsing


def test_resolved_recipe_fills_defaults():
    recipe = load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml")
    assert recipe.resolved["algorithm"]["avr_alpha"] == 0.99  # a DxDPConfig default
    assert recipe.resolved["train"]["lr_schedule"] == "constant"  # a TrainConfig default
    assert recipe.resolved["backbone"]["beta_end"] == 0.02  # a factory keyword default


def test_overrides_are_type_checked_like_the_file():
    raw = {"train": {"steps": 5}}
    apply_override(raw, "train.steps=7")
    apply_override(raw, "algorithm.time_cost=sigmoid")  # a bare word is a string
    apply_override(raw, "train.lr_final_fraction=1e-2")
    assert raw == {"train": {"steps": 7, "lr_final_fraction": 0.01}, "algorithm": {"time_cost": "sigmoid"}}
    with pytest.raises(RecipeError, match="unknown table \\[trian\\] \\(did you mean 'train'\\?\\)"):
        apply_override(raw, "trian.steps=1")
    with pytest.raises(RecipeError, match="expected an integer, got 1.5"):
        load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml", ["train.steps=1.5"])
    with pytest.raises(RecipeError, match="ema_decay must be in \\[0, 1\\]"):
        load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml", ["train.ema_decay=2"])


def test_int_is_accepted_for_float_but_bool_is_not_int():
    recipe = load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml", ["algorithm.sampler_lr=1"])
    assert recipe.plugins["algorithm"].options["config"].sampler_lr == 1.0
    with pytest.raises(RecipeError, match="expected an integer, got True"):
        load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml", ["train.steps=true"])


def test_registry_decorator_dotted_path_and_suggestions():
    registry = Registry("reward", "rewardtune.test_group_nobody_uses", {"energy": "rewardtune.rewards.energy:build_energy_reward"})

    @registry.register("my_reward")
    def factory(*, scale: float = 1.0):
        return scale

    assert registry.get("my_reward") is factory
    assert registry.get("rewardtune.rewards.energy:build_energy_reward") is REWARDS.get("energy")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("my_reward")(factory)
    with pytest.raises(PluginNotFoundError, match="did you mean 'my_reward'"):
        registry.get("my_rewards")
    with pytest.raises(PluginNotFoundError, match="has no attribute 'nope'"):
        registry.get("rewardtune.rewards.energy:nope")


def test_set_reaches_keys_of_nested_tables():
    from rewardtune.errors import RecipeError
    from rewardtune.recipe import apply_override

    raw = {"conditions": {"kind": "jsonl", "text_encoder": {"kind": "hash", "dim": 8}}, "backbone": {"kind": "mlp"}}
    apply_override(raw, "conditions.text_encoder.dim=16")
    apply_override(raw, "backbone.unet.block_out_channels=[8, 16]")
    assert raw["conditions"]["text_encoder"] == {"kind": "hash", "dim": 16}
    assert raw["backbone"]["unet"] == {"block_out_channels": [8, 16]}
    with pytest.raises(RecipeError, match="conditions.kind is not a table"):
        apply_override(raw, "conditions.kind.x=1")
