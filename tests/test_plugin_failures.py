"""A plugin that fails in its own code is named, and the run is left resumable.

The table of one-line messages (every plugin kind, every call site) is in tests/test_bad_inputs.py; here: the last
checkpoint survives a failure at a training step, `--debug` shows the plugin's own traceback, `eval` and `sample`
name a plugin failing after training, and `PluginOwners` attributes an exception to the innermost plugin frame and to
nothing when rewardtune's own code raised it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_cli import cli

from rewardtune.errors import PluginError, RecipeError
from rewardtune.plugin_failures import PluginOwners

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_8gaussians.toml"
SETS = ["train.steps=4", "train.checkpoint_every=2", "eval.num_samples=100", "eval.repeats=1", "eval.plot=false"]


def run_args(out: Path, *sets: str) -> list[str]:
    return ["run", str(TINY), "--out", str(out), *[a for s in [*SETS, *sets] for a in ("--set", s)]]


def test_a_failure_at_a_step_keeps_the_last_checkpoint(tmp_path: Path, capsys):
    """The reward raises at step 3 (its 4th call, after the step-0 evaluation and steps 1-2): exit 2 naming it and
    the step; checkpoints/latest is step 2, which `eval` loads and evaluates."""
    out = tmp_path / "run"
    code, _, err = cli(capsys, *run_args(out, "reward.kind=faulty_plugins:build_failing_reward", "reward.fail_at=4"))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "error: [reward] kind 'faulty_plugins:build_failing_reward' failed at step 3 (RuntimeError: forward exploded); "
        "the last checkpoint is kept"
    )
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not list((out / "checkpoints").glob(".tmp*"))
    code, stdout, err = cli(capsys, "eval", str(out))
    assert code == 0, err
    assert f"{out} step 2" in stdout


def test_debug_shows_the_plugins_own_traceback(tmp_path: Path, capsys):
    """With --debug the PluginError propagates, its cause the plugin's exception, raised in faulty_plugins.py."""
    from rewardtune.cli import main

    args = run_args(tmp_path / "run", "reward.kind=faulty_plugins:build_reward_missing_weights")
    old = sys.argv
    sys.argv = ["rewardtune", "--debug", *args]
    try:
        with pytest.raises(PluginError, match="failed while the recipe was built") as info:
            main()
    finally:
        sys.argv = old
    cause = info.value.__cause__
    assert isinstance(cause, FileNotFoundError)
    frames = [frame.filename for frame in __import__("traceback").extract_tb(cause.__traceback__)]
    assert frames[-1].endswith("faulty_plugins.py")


def test_eval_and_sample_name_a_plugin_failing_after_training(tmp_path: Path, capsys):
    """A run trained with a backbone that never fails; its recipe.toml then makes the network fail on its first call,
    as a plugin whose weights or code changed since would: `eval` and `sample` exit 2 naming it."""
    out = tmp_path / "run"
    code, _, err = cli(capsys, *run_args(out, "backbone.kind=faulty_plugins:build_failing_backbone", "backbone.fail_at=0"))
    assert code == 0, err
    recipe = out / "recipe.toml"
    recipe.write_text(recipe.read_text().replace("fail_at = 0", "fail_at = 1"))
    label = "[backbone] kind 'faulty_plugins:build_failing_backbone' failed"
    code, _, err = cli(capsys, "eval", str(out))
    assert code == 2
    assert err.strip().splitlines() == [f"error: {label} in the evaluation at step 4 (RuntimeError: backbone network exploded)"]
    code, _, err = cli(capsys, "sample", str(out), "-n", "4", "-o", str(tmp_path / "s.npz"))
    assert code == 2
    assert err.strip().splitlines() == [f"error: {label} while sampling (RuntimeError: backbone network exploded)"]


def raise_from_plugin(owners: PluginOwners, plugin_code, when: str = "at step 7"):
    with owners.attributing(when, "the last checkpoint is kept"):
        plugin_code()


def test_owners_name_the_innermost_plugin_frame(tmp_path: Path, monkeypatch):
    """Two plugin packages, one calling the other: the failure is the callee's. torch frames inside do not matter."""
    (tmp_path / "rt_outer_plugin.py").write_text("import rt_inner_plugin\ndef run():\n    rt_inner_plugin.run()\n")
    (tmp_path / "rt_inner_plugin.py").write_text(
        "import torch\ndef run():\n    torch.zeros(2) @ torch.zeros(3)\n"  # raises inside torch
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import rt_outer_plugin

    owners = PluginOwners()
    owners.add("rt_outer_plugin", "[reward] kind 'rt_outer_plugin:build'")
    owners.add("rt_inner_plugin.sub", "[value] kind 'rt_inner_plugin:build'")
    with pytest.raises(PluginError) as info:
        raise_from_plugin(owners, rt_outer_plugin.run)
    message = str(info.value)
    assert message.startswith("[value] kind 'rt_inner_plugin:build' failed at step 7 (RuntimeError: ")
    assert message.endswith("; the last checkpoint is kept") and "\n" not in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_owners_leave_rewardtunes_own_errors_alone():
    """An exception raised by no plugin's code (here: this test module, not a plugin) stays what it is; a
    RewardtuneError other than PluginError passes unchanged; a PluginError gets the "when"."""
    owners = PluginOwners()
    owners.add("rewardtune.rewards.energy", "[reward] kind 'energy'")  # rewardtune's own code is never a plugin
    owners.add("some_plugin", "[reward] kind 'some_plugin:build'")
    assert owners.owners == [owners.owners[0]] and owners.owners[0].package == "some_plugin"

    def own_bug():
        raise KeyError("bug")

    def recipe_error():
        raise RecipeError("bad key")

    def contract():
        raise PluginError("reward 'x' returned shape (3, 1)")

    with pytest.raises(KeyError):
        raise_from_plugin(owners, own_bug)
    with pytest.raises(RecipeError, match="^bad key$"):
        raise_from_plugin(owners, recipe_error)
    with pytest.raises(PluginError, match=r"^reward 'x' returned shape \(3, 1\) at step 7; the last checkpoint is kept$"):
        raise_from_plugin(owners, contract)


def test_a_trainer_built_in_python_names_plugins_by_class():
    """Without a recipe, the Trainer's owners come from the objects' classes: a failing reward is named by its table
    and class."""
    import torch
    from faulty_plugins import FailingReward

    import rewardtune as rt

    torch.manual_seed(0)
    backbone = rt.build_mlp_backbone((2,), num_steps=2, hidden=8, depth=1, time_dim=8)
    value = rt.build_time_mlp_value((2,), hidden=8, depth=1, time_dim=8)
    reward = FailingReward("forward", fail_at=2)
    trainer = rt.Trainer(
        backbone=backbone, algorithm=rt.DxDP(backbone, reward, value, config=rt.DxDPConfig()), reward=reward,
        data=rt.EightGaussians(), evaluator=rt.ToyEvaluator(rt.EightGaussians(), num_samples=50, repeats=1),
        config=rt.TrainConfig(steps=2, batch_size=8), eval_config=rt.EvalConfig(plot=False),
    )
    with pytest.raises(PluginError, match=r"^\[reward\] faulty_plugins.FailingReward failed at step 1 \(RuntimeError"):
        trainer.fit()
