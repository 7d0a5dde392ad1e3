"""Resuming is exact: a run interrupted at a checkpoint and resumed ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rewardtune as rt
from rewardtune.errors import Interrupted

ROOT = Path(__file__).resolve().parents[1]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


class StopAt:
    """A reporter that sends this process SIGTERM at a given step (the trainer's handler then stops it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def start(self, total, done, description):
        pass

    def advance(self, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def message(self, text):
        pass

    def stop(self):
        pass


def test_resumed_run_matches_uninterrupted_run(tmp_path: Path):
    overrides = ["train.steps=20", "train.checkpoint_every=10", "train.ema_decay=0.9", "train.lr_schedule=cosine"]
    recipe = rt.load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml", overrides)
    straight = rt.run_recipe(recipe, tmp_path / "straight")

    with pytest.raises(Interrupted, match="stopped by SIGTERM at step 7") as info:  # SIGTERM during step 7 ...
        rt.run_recipe(recipe, tmp_path / "resumed", reporter=StopAt(7))
    assert info.value.exit_code == 143
    resumed = rt.run_recipe(recipe, tmp_path / "resumed", resume=True)  # ... checkpoints; --resume continues

    assert resumed["step"] == straight["step"] == 20
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise: RNG, optimiser, AVR, EMA and schedule all restored
    assert resumed["metrics"] == straight["metrics"]
    assert json.loads((tmp_path / "resumed" / "eval.json").read_text())["metrics"] == straight["metrics"]
    # training time continues across the resume (stored in the checkpoint), so metrics.jsonl's clock never goes back
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in records]
    assert [r["step"] for r in records if r["step"] > 7] and times == sorted(times)

