"""`train.channels_last = true` (memory_format.py): the digits UNet's convolution weights (and the EMA copy's) change
memory order, not values; training gives the same numbers to round-off; a run resumes across a switch either way."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_cli import cli

import rewardtune as rt
from rewardtune.memory_format import is_channels_last, to_channels_last

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.batch_size=4", "value.channels=8", "backbone.init_from=", "eval.num_samples=16", "train.eval_every=2"]


def trained(channels_last: bool):
    torch.manual_seed(0)
    recipe = rt.load_recipe(ROOT / "recipes" / "dxmi_digits.toml", [*TINY, f"train.channels_last={str(channels_last).lower()}"])
    trainer = rt.build_trainer(recipe)
    trainer.algorithm.iteration = 10**9  # past the value warm-up: the policy step runs too
    metrics = []
    for _ in range(2):
        metrics.append(trainer.train_step())
        trainer.step += 1
    return trainer, metrics


def test_only_the_memory_order_changes():
    plain, plain_metrics = trained(False)
    last, last_metrics = trained(True)
    convs = [p for p in last.backbone.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(is_channels_last(p) for p in convs)  # (a 1x1 kernel is both orders at once)
    assert any(is_channels_last(p) for p in last.ema.module.parameters())  # the EMA copy follows
    assert not any(is_channels_last(p) for p in plain.backbone.parameters())
    for a, b in zip(plain_metrics, last_metrics):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-3 * (1 + abs(a[key])), key  # the same sums in another order
    for a, b in zip(plain.backbone.state_dict().values(), last.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert to_channels_last([torch.nn.Linear(3, 3)]) == 0  # vector networks are untouched


def test_a_run_resumes_across_a_switch_either_way(tmp_path: Path, capsys):
    run = tmp_path / "run"
    sets = [arg for item in TINY for arg in ("--set", item)]
    code, _, err = cli(capsys, "run", str(ROOT / "recipes" / "dxmi_digits.toml"), "--out", str(run), "--steps", "2", *sets)
    assert code == 0, err
    for steps, flag in (("3", "true"), ("4", "false")):
        code, _, err = cli(capsys, "run", str(ROOT / "recipes" / "dxmi_digits.toml"), "--out", str(run), "--resume",
                           "--force", "--steps", steps, *sets, "--set", f"train.channels_last={flag}")
        assert code == 0, err
        assert json.loads((run / "eval.json").read_text())["step"] == int(steps)
