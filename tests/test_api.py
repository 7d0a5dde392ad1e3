"""The Python API shown in README.md: composing the pieces by hand, and running a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rewardtune as rt
from rewardtune.algorithms.dxdp import DxDP, DxDPConfig

ROOT = Path(__file__).resolve().parents[1]


def test_compose_and_fit_like_the_readme(tmp_path: Path):
    data = rt.EightGaussians()
    backbone = rt.build_mlp_backbone((2,), num_steps=3, hidden=32, depth=2)
    value = rt.build_time_mlp_value((2,), hidden=32, depth=2, lr=1e-3)
    reward = rt.build_energy_reward((2,), value, 3, share_with_value=True)
    algorithm = DxDP(backbone, reward, value, config=DxDPConfig(tau_entropy=0.1, tau_velocity=0.1))
    before = [p.detach().clone() for p in backbone.parameters()]
    trainer = rt.Trainer(
        backbone=backbone, algorithm=algorithm, reward=reward, data=data,
        evaluator=rt.ToyEvaluator(data, num_samples=300, repeats=2), config=rt.TrainConfig(steps=15, batch_size=32),
        out_dir=tmp_path / "run",
    )
    result = trainer.fit()
    assert result["step"] == 15
    assert set(result["metrics"]) == {"sliced_wasserstein", "sliced_wasserstein_std", "energy_auc"}
    assert any(not torch.equal(a, b) for a, b in zip(before, backbone.parameters()))  # the sampler was trained
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["step"] == 15


def test_run_recipe_and_load_run(tmp_path: Path):
    recipe = rt.load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml", ["train.steps=10"])
    result = rt.run_recipe(recipe, tmp_path / "tiny")
    assert result["step"] == 10
    trainer = rt.load_run(tmp_path / "tiny")
    assert trainer.step == 10
    assert trainer.evaluate() == result["metrics"]  # evaluation is seeded: the same checkpoint gives the same numbers


def test_shared_energy_is_the_terminal_value():
    value = rt.build_time_mlp_value((2,), hidden=16, depth=1)
    reward = rt.build_energy_reward((2,), value, 4)
    x = torch.randn(5, 2)
    torch.testing.assert_close(reward.cost(x), value(x, torch.full((5,), 4)), rtol=0, atol=0)  # the same network
    assert reward.shares_value(value)
    with pytest.raises(ValueError, match="belongs to the \\[value\\] section"):
        rt.build_energy_reward((2,), value, 4, lr=1e-2)
