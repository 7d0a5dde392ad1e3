"""The reward recipes end to end on CPU: CLIP with a tiny local open_clip model (the documented command for the
real model is the same recipe with the model name changed), and the digits classifier / JPEG plugins."""

from __future__ import annotations

import importlib.util
import json

import pytest
from test_cli import ROOT, cli
from test_image_recipes import tiny_cifar  # noqa: F401  (fixture: a tiny UNet and an image folder)
from test_rewards import tiny_clip_dir  # noqa: F401  (fixture: a tiny open_clip model folder)

TINY_RUN = ["--steps", "4", "--set", "value.channels=8", "--set", "train.batch_size=4", "--set", "train.eval_every=2",
            "--set", "eval.num_samples=16", "--set", "algorithm.value_warmup=1"]


def test_clip_recipe_runs_with_a_tiny_local_model(tiny_cifar, tiny_clip_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(ROOT)
    unet, images = tiny_cifar
    out = tmp_path / "clip"
    code, _, err = cli(
        capsys, "run", "recipes/clip_ddpm_cifar10.toml", "--out", str(out), *TINY_RUN,
        "--set", f"reward.model=local-dir:{tiny_clip_dir}", "--set", f"backbone.pretrained={unet}",
        "--set", "data.kind=image_folder", "--set", f"data.path={images}",
        "--set", "eval.feature_extractor=helpers:tiny_features", "--set", "algorithm.kl_weight=0.01",
    )
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    assert {"frechet_distance", "reward_mean"} <= set(result["metrics"]) and result["step"] == 4


@pytest.mark.skipif(importlib.util.find_spec("rewardtune_digits_classifier") is None,
                    reason="plugin package rewardtune-digits-classifier is not installed (.ci/run installs it)")
def test_classifier_digits_recipe_reports_target_class_fraction(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    pretrain = tmp_path / "ddpm"
    code, _, err = cli(capsys, "run", "recipes/ddpm_digits.toml", "--out", str(pretrain), "--steps", "5",
                       "--set", "eval.num_samples=16", "--set", "train.batch_size=8")
    assert code == 0, err
    out = tmp_path / "classifier"
    code, _, err = cli(capsys, "run", "recipes/classifier_digits.toml", "--out", str(out), *TINY_RUN[:-2],
                       "--set", "algorithm.value_warmup=1", "--set", f"backbone.init_from={pretrain}")
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    for block in ("metrics", "initial_metrics"):
        assert {"target_class_fraction", "reward_mean", "frechet_distance"} <= set(result[block])
        assert 0.0 <= result[block]["target_class_fraction"] <= 1.0
