"""Every shipped recipe is built or run here or in another test, so that a recipe that no longer builds cannot ship.

Recipes that need no download are built as they are (pretraining skipped with `backbone.init_from=`); the ones that
name pretrained weights or datasets run with tiny local stand-ins; the digits distillation recipes run end to end
from a two-step digits teacher.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from test_cli import ROOT, cli
from test_image_recipes import tiny_cifar  # noqa: F401  (fixture: a tiny UNet and an image folder)
from test_rewards import tiny_clip_dir  # noqa: F401  (fixture: a tiny open_clip model folder)

from rewardtune.build import build_experiment
from rewardtune.recipe import load_recipe

RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.toml"))
# Recipes that cannot be built offline as they stand, and the test that runs each with local stand-ins.
COVERED_ELSEWHERE = {
    "ddaebm_cifar10.toml": "test_ddaebm.py::test_the_cifar10_recipe_runs_with_local_stand_ins",
    "dg_cifar10_edm.toml": "test_discriminator_guidance.py::test_the_edm_cifar10_recipe_runs_with_local_stand_ins",
    "dxmi_cifar10.toml": "test_image_recipes.py",
    "dxmi_cifar10_t4.toml": "test_image_recipes.py",
    "distill_cifar10.toml": "test_image_recipes.py",
    "clip_ddpm_cifar10.toml": "test_reward_recipes.py",
    "distill_8gaussians.toml": "test_distill.py",
    "aesthetic_ddpm_cifar10.toml": "test_aesthetic_recipe_runs_with_local_stand_ins below",
    "dxmi_edm_imagenet64.toml": "test_edm_recipe_runs_with_a_local_network below",
    "distill_digits.toml": "test_digits_distillation_recipes_run below",
    "distill_digits_large.toml": "test_digits_distillation_recipes_run below",
    "sd15_aesthetic.toml": "test_latent.py::test_the_sd15_recipes_run_with_local_stand_ins",
    "sd15_clip.toml": "test_latent.py::test_the_sd15_recipes_run_with_local_stand_ins",
    "sd3_clip.toml": "test_sd3.py::test_the_sd3_recipe_runs_with_local_stand_ins",
    "flux_clip.toml": "test_flux.py::test_the_flux_recipe_runs_with_local_stand_ins",
    "dxmi_mvtec.toml": "test_anomaly.py::test_mvtec_recipe_trains_and_reports_aurocs_per_category (a synthetic MVTec folder)",
}
TINY = ["--set", "train.batch_size=4", "--set", "train.eval_every=2", "--set", "train.log_every=1", "--set", "eval.num_samples=16",
        "--set", "value.channels=8"]


# Build-time work a recipe does that the build check does not need in full (the autoencoder energy's pretraining).
BUILD_OVERRIDES = {"anomaly_digits_defects.toml": ["reward.pretrain_steps=10"]}


# Recipes whose reward is an example plugin package (.ci/run installs both).
PLUGIN_PACKAGES = {"classifier_digits.toml": "rewardtune_digits_classifier",
                   "pg_classifier_digits.toml": "rewardtune_digits_classifier", "jpeg_digits.toml": "rewardtune_jpeg"}


@pytest.mark.parametrize("name", [n for n in RECIPES if n not in COVERED_ELSEWHERE])
def test_recipe_builds_offline(name: str, monkeypatch):
    if name in PLUGIN_PACKAGES and importlib.util.find_spec(PLUGIN_PACKAGES[name]) is None:
        pytest.skip(f"plugin package {PLUGIN_PACKAGES[name]} is not installed (.ci/run installs it)")
    monkeypatch.chdir(ROOT)
    text = (ROOT / "recipes" / name).read_text()
    overrides = (["backbone.init_from="] if "init_from" in text else []) + BUILD_OVERRIDES.get(name, [])
    recipe = load_recipe(ROOT / "recipes" / name, overrides)
    experiment = build_experiment(recipe)
    assert experiment.backbone.num_steps == recipe.plugins["backbone"].options.get("num_steps", experiment.backbone.num_steps)
    assert experiment.algorithm is not None


def test_every_recipe_is_covered():
    assert set(COVERED_ELSEWHERE) <= set(RECIPES)  # no stale entries


def test_digits_distillation_recipes_run(tmp_path: Path, capsys, monkeypatch):
    """The digits recipes' teacher (2 steps from a random UNet) and both distillation recipes, with regression cut to
    2 iterations so that phase 2 (DxMI at T = 1, the restarted schedule) runs too."""
    monkeypatch.chdir(ROOT)
    teacher = tmp_path / "teacher"
    code, _, err = cli(capsys, "run", "recipes/dxmi_digits.toml", "--out", str(teacher), "--steps", "2",
                       "--set", "backbone.init_from=", *TINY)
    assert code == 0, err
    for recipe in ("distill_digits.toml", "distill_digits_large.toml"):
        out = tmp_path / recipe
        code, _, err = cli(capsys, "distill", f"recipes/{recipe}", "--teacher", str(teacher), "--out", str(out),
                           "--steps", "4", "--set", "algorithm.regression_steps=2", *TINY)
        assert code == 0, err
        result = json.loads((out / "eval.json").read_text())
        assert result["step"] == 4 and "frechet_distance" in result["metrics"]
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("distill/mse" in r for r in logged) and any("value/td_loss" in r for r in logged)  # both phases


def test_edm_recipe_runs_with_a_local_network(tmp_path: Path, capsys, monkeypatch, tiny_cifar):  # noqa: F811
    monkeypatch.chdir(ROOT)
    _, images = tiny_cifar
    classes = tmp_path / "classes"  # ImageNet's layout: one folder per class (the recipe is class-conditional)
    for i, image in enumerate(sorted(images.glob("*.png"))):
        (classes / f"n{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, classes / f"n{i % 2}" / image.name)
    out = tmp_path / "edm"
    code, _, err = cli(capsys, "run", "recipes/dxmi_edm_imagenet64.toml", "--out", str(out), "--steps", "2", *TINY,
                       "--set", f"data.path={classes}", "--set", "data.size=16", "--set", "conditions.num_classes=2",
                       "--set", "backbone.network=helpers:tiny_edm_network",
                       "--set", "eval.feature_extractor=helpers:tiny_features")
    assert code == 0, err
    assert json.loads((out / "eval.json").read_text())["step"] == 2


def test_aesthetic_recipe_runs_with_local_stand_ins(tmp_path: Path, capsys, monkeypatch, tiny_cifar, tiny_clip_dir):  # noqa: F811
    import torch

    from rewardtune.rewards.aesthetic import AestheticHead

    monkeypatch.chdir(ROOT)
    unet, images = tiny_cifar
    torch.manual_seed(0)
    head = tmp_path / "head.pth"
    torch.save(AestheticHead(16).state_dict(), head)
    out = tmp_path / "aesthetic"
    code, _, err = cli(capsys, "run", "recipes/aesthetic_ddpm_cifar10.toml", "--out", str(out), "--steps", "2", *TINY,
                       "--set", f"reward.model=local-dir:{tiny_clip_dir}", "--set", f"reward.head={head}",
                       "--set", f"backbone.pretrained={unet}", "--set", "data.kind=image_folder",
                       "--set", f"data.path={images}", "--set", "algorithm.value_warmup=1",
                       "--set", "eval.feature_extractor=helpers:tiny_features")
    assert code == 0, err
    assert json.loads((out / "eval.json").read_text())["step"] == 2
