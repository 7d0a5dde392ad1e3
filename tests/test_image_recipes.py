"""The CIFAR-10 recipe's own code path, with overrides that swap in a tiny random UNet (saved and loaded through
from_pretrained), a small local image folder and an offline feature extractor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import ROOT, cli


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> tuple[Path, Path]:
    from diffusers import UNet2DModel
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_cifar")
    torch.manual_seed(0)
    UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[8, 16],
        down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"], norm_num_groups=4,
    ).save_pretrained(root / "unet")
    (root / "images").mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(24):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
    return root / "unet", root / "images"


@pytest.mark.parametrize("recipe", ["dxmi_cifar10.toml", "dxmi_cifar10_t4.toml"])
def test_cifar10_recipe_runs_with_a_tiny_unet(recipe, tiny_cifar, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    unet, images = tiny_cifar
    out = tmp_path / "run"
    code, _, err = cli(
        capsys, "run", f"recipes/{recipe}", "--out", str(out), "--steps", "4",
        "--set", f"backbone.pretrained={unet}", "--set", "data.kind=image_folder", "--set", f"data.path={images}",
        "--set", "value.channels=8", "--set", "train.batch_size=4", "--set", "train.eval_every=2",
        "--set", "train.checkpoint_every=2", "--set", "eval.num_samples=16", "--set", "eval.feature_extractor=helpers:tiny_features",
    )
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 4
    assert set(result["metrics"]) == {"frechet_distance", "precision", "recall"}
    assert (out / "samples.png").is_file() and (out / "samples_step2.png").is_file()
    best = json.loads((out / "checkpoints" / "best" / "best.json").read_text())
    assert best["metric"] == "frechet_distance" and best["step"] == 2
    if recipe == "dxmi_cifar10.toml":  # sampling to a grid, a folder of PNGs and an array
        for target in ("grid.png", "pngs", "arr.npz"):
            code, _, err = cli(capsys, "sample", str(out), "-n", "6", "-o", str(tmp_path / target), "--best")
            assert code == 0, err
        assert len(list((tmp_path / "pngs").glob("*.png"))) == 6
        import numpy as np

        assert np.load(tmp_path / "arr.npz")["samples"].shape == (6, 3, 32, 32)


def test_cifar10_offline_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = cli(capsys, "run", "recipes/dxmi_cifar10.toml", "--out", str(tmp_path / "r"),
                       "--set", f"data.root={tmp_path / 'nothing'}", "--set", "data.download=false")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "CIFAR-10 is not in" in lines[0], err


def test_distill_cifar10_recipe_runs_with_a_tiny_teacher(tiny_cifar, tmp_path, capsys, monkeypatch):
    """The CIFAR-10 distillation recipe's own code path: a tiny DxMI teacher run, then the one-step student started
    from the teacher's UNet (init_from_teacher), through regression and DxDP at T = 1."""
    monkeypatch.chdir(ROOT)
    unet, images = tiny_cifar
    small = [
        "--set", f"backbone.pretrained={unet}", "--set", "data.kind=image_folder", "--set", f"data.path={images}",
        "--set", "value.channels=8", "--set", "train.batch_size=4", "--set", "train.eval_every=2",
        "--set", "train.checkpoint_every=2", "--set", "eval.num_samples=16", "--set", "eval.feature_extractor=helpers:tiny_features",
    ]
    teacher = tmp_path / "teacher"
    code, _, err = cli(capsys, "run", "recipes/dxmi_cifar10.toml", "--out", str(teacher), "--steps", "2", *small)
    assert code == 0, err
    out = tmp_path / "student"
    code, _, err = cli(
        capsys, "distill", "recipes/distill_cifar10.toml", "--teacher", str(teacher), "--out", str(out), "--steps", "4",
        "--set", "algorithm.regression_steps=2", "--set", "train.log_every=1", *small,
    )
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 4 and set(result["metrics"]) == {"frechet_distance", "precision", "recall"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("distill/mse" in r for r in records) and any("policy/loss" in r for r in records)
