"""The trainer owns the networks' train/eval mode (issue #12, item 3).

A digits DDPM UNet built with dropout 0.1, from a `save_pretrained` folder (diffusers returns it in eval mode) or from
a `unet` table (train mode): rollouts, PPO's log-prob recomputation and evaluation must run in one explicit mode,
whatever the source, the EMA setting, or the mode a module was left in.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rewardtune.build import build_experiment
from rewardtune.recipe import parse_recipe
from rewardtune.rewards.base import Reward
from rewardtune.trainer import EvalConfig, Trainer

UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1, "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4, "dropout": 0.1,
}


def digits_recipe(tmp_path: Path, source: str, ema_decay: float, algorithm: dict):
    """The digits DDPM (T = 4) with dropout, its UNet from a save_pretrained folder or a `unet` table."""
    backbone = {"kind": "ddpm", "num_steps": 4}
    if source == "pretrained":
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        UNet2DModel(**UNET).save_pretrained(tmp_path / "unet")
        backbone["pretrained"] = str(tmp_path / "unet")
    else:
        backbone.update(pretrained="", unet=UNET)
    raw = {
        "run": {"name": "modes"},
        "data": {"kind": "digits"},
        "backbone": backbone,
        "reward": {"kind": "faulty_rewards:build_faulty_reward"},  # mode "ok": a plain differentiable reward
        "algorithm": algorithm,
        "train": {"steps": 1, "batch_size": 8, "ema_decay": ema_decay, "log_every": 1},
        "eval": {"num_samples": 16, "feature_extractor": "helpers:tiny_features", "plot": False},
    }
    return parse_recipe(raw)


def make_trainer(recipe, **overrides) -> Trainer:
    exp = build_experiment(recipe)
    options = {
        "backbone": exp.backbone, "algorithm": exp.algorithm, "reward": exp.reward, "data": exp.data,
        "evaluator": exp.evaluator, "config": recipe.train, "eval_config": recipe.eval,
    }
    return Trainer(**{**options, **overrides})


class Recorder:
    """A Reporter that keeps each step's training metrics."""

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}

    def start(self, total: int, done: int, description: str) -> None:
        pass

    def advance(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics[step] = metrics

    def message(self, text: str) -> None:
        pass

    def stop(self) -> None:
        pass


PPO_ONE_PASS = {"kind": "policy_gradient", "ppo_epochs": 1, "minibatches": 1, "sampler_lr": 1e-6}


@pytest.mark.parametrize("ema_decay", [0.0, 0.9], ids=["no_ema", "ema"])
@pytest.mark.parametrize("source", ["pretrained", "unet_table"])
def test_the_first_ppo_pass_has_ratio_one_with_dropout(tmp_path, source, ema_decay):
    """After the step-0 evaluation, one PPO pass on the batch just sampled: the recomputed log-probs equal the
    sampled ones, so no ratio is clipped and the approximate KL is 0 (measured before the fix with dropout active in
    rollout and recomputation: clip fraction 0.99, approx_kl ~ 850)."""
    recorder = Recorder()
    trainer = make_trainer(digits_recipe(tmp_path, source, ema_decay, PPO_ONE_PASS), reporter=recorder)
    trainer.fit()
    metrics = recorder.metrics[1]
    assert metrics["policy/clip_fraction"] == 0.0
    # float32 recomputation of log-probs summed over 64 pixels: |log ratio| ~ 1e-5, so k3 = ratio - 1 - log ratio ~ 1e-10
    assert abs(metrics["policy/approx_kl"]) < 1e-7


class ModeLog:
    """Records the backbone's mode when it is sampled (rollouts, evaluation) and when the algorithm updates."""

    def __init__(self, trainer: Trainer) -> None:
        self.sample: list[bool] = []
        self.update: list[bool] = []
        backbone, algorithm = trainer.backbone, trainer.algorithm
        sample, update = backbone.sample, algorithm.update

        def logged_sample(*args, **kwargs):
            self.sample.append(backbone.training)
            return sample(*args, **kwargs)

        def logged_update(*args, **kwargs):
            self.update.append(backbone.training)
            return update(*args, **kwargs)

        backbone.sample, algorithm.update = logged_sample, logged_update


@pytest.mark.parametrize(
    ("algorithm", "update_in_train_mode"),
    [(PPO_ONE_PASS, False), ({"kind": "ddpm", "lr": 1e-4}, True)],
    ids=["policy_gradient", "ddpm"],
)
def test_the_algorithm_declares_the_update_mode_and_rollouts_are_in_eval_mode(tmp_path, algorithm, update_in_train_mode):
    """Fine-tuning updates the policy it samples (eval mode); DDPM pretraining trains with dropout (train mode). The
    backbone rests in eval mode between phases, whatever the source left it in."""
    trainer = make_trainer(digits_recipe(tmp_path, "unet_table", 0.0, algorithm))
    trainer.backbone.train()  # as a unet table builds it
    log = ModeLog(trainer)
    trainer.config = trainer.config.__class__(**{**trainer.config.__dict__, "steps": 2})
    trainer.fit()
    assert log.update == [update_in_train_mode] * 2
    assert log.sample and not any(log.sample)  # rollouts and evaluations (both sample the backbone: no EMA)
    assert not any(module.training for module in trainer.backbone.modules())


class DropoutReward(Reward):
    """r(x) = -mean(dropout(x)^2): a reward whose value depends on its mode, with a frozen submodule."""

    name = "dropout"
    differentiable = True
    learns = False

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)
        self.frozen = nn.Linear(1, 1).eval()  # e.g. a classifier: eval whatever the reward's mode

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        return -self.dropout(x).flatten(1).pow(2).mean(1)


def module_modes(*modules: nn.Module) -> list[bool]:
    return [sub.training for module in modules for sub in module.modules()]


@pytest.mark.parametrize("ema_decay", [0.0, 0.9], ids=["no_ema", "ema"])
def test_evaluation_does_not_depend_on_the_modes_modules_were_left_in(tmp_path, ema_decay):
    """Evaluate once with every module left in train mode and once in eval mode: the same numbers, and each
    submodule (the reward's frozen one included) keeps the mode it had."""
    recipe = digits_recipe(tmp_path, "unet_table", ema_decay, {"kind": "ddpm"})
    eval_config = EvalConfig(num_samples=16, feature_extractor="helpers:tiny_features", plot=False)
    trainer = make_trainer(recipe, reward=DropoutReward(), eval_config=eval_config)
    modules = [trainer.backbone, trainer.evaluated_backbone(), trainer.reward]
    results = {}
    for left_in_train_mode in (True, False):
        for module in modules:
            module.train(left_in_train_mode)
        trainer.reward.frozen.eval()
        before = module_modes(*modules)
        results[left_in_train_mode] = trainer.evaluate()
        assert module_modes(*modules) == before
    assert results[True] == results[False]
    assert "reward_mean" in results[True]
