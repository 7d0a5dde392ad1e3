"""`rewardtune export` of pixel-space runs: an unconditional ddpm run becomes a DDPMPipeline folder whose sampler
reproduces `rewardtune sample`; backbones with no diffusers pipeline are a one-line error (exit 2). The sd backbone's
export is tested in test_latent.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from test_cli import cli
from test_images import TINY_UNET

from rewardtune.export import sample_exported

ROOT = Path(__file__).resolve().parents[1]


def write(tables: dict, path: Path) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(tables))
    return path


def ddpm_tables(**backbone) -> dict:
    return {
        "data": {"kind": "digits"},
        "backbone": {"kind": "ddpm", "pretrained": "", "unet": TINY_UNET, "num_steps": 3, **backbone},
        "algorithm": {"kind": "ddpm"},
        "train": {"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 2},
        "eval": {"num_samples": 8, "feature_extractor": "helpers:tiny_features"},
    }


def test_an_exported_ddpm_run_is_a_ddpm_pipeline_that_samples_as_the_run(tmp_path, capsys):
    from diffusers import DDPMPipeline, DiffusionPipeline

    recipe = write(ddpm_tables(), tmp_path / "ddpm.toml")
    assert cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"))[0] == 0
    code, _, err = cli(capsys, "sample", str(tmp_path / "run"), "-n", "5", "--seed", "3", "-o", str(tmp_path / "s.npz"))
    assert code == 0, err
    code, _, err = cli(capsys, "export", str(tmp_path / "run"), "--to", str(tmp_path / "out"))
    assert code == 0, err
    assert isinstance(DiffusionPipeline.from_pretrained(tmp_path / "out"), DDPMPipeline)
    expected = torch.from_numpy(np.load(tmp_path / "s.npz")["samples"])
    torch.testing.assert_close(sample_exported(tmp_path / "out", 5, seed=3), expected, rtol=1e-5, atol=1e-5)


def test_runs_without_a_diffusers_pipeline_are_refused(tmp_path, capsys):
    recipe = ROOT / "recipes" / "tiny_8gaussians.toml"
    assert cli(capsys, "run", str(recipe), "--out", str(tmp_path / "mlp"), "--set", "train.steps=1")[0] == 0
    code, _, err = cli(capsys, "export", str(tmp_path / "mlp"), "--to", str(tmp_path / "out"))
    assert code == 2 and "no diffusers equivalent (an mlp" in err and err.count("\n") == 1
    conditional = ddpm_tables()
    conditional["conditions"] = {"kind": "labels", "num_classes": 10, "distribution": "data"}
    recipe = write(conditional, tmp_path / "cond.toml")
    assert cli(capsys, "run", str(recipe), "--out", str(tmp_path / "cond"))[0] == 0
    code, _, err = cli(capsys, "export", str(tmp_path / "cond"), "--to", str(tmp_path / "out2"))
    assert code == 2 and "no diffusers equivalent" in err

