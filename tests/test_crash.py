"""Crash safety: a run killed with SIGKILL resumes to exactly the result of an uninterrupted run, and a NaN stops a
run with an error naming the term and the step while the last good checkpoint stays intact."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import cli

from rewardtune import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_8gaussians.toml"
STEPS = 400  # long enough that the kill below always lands mid-run, even on an idle machine
# Every kind of saved state is in play: RNG streams, three Adam states (sampler, value, and the separate energy's),
# DxDP's AVR s_t^2 and iteration count, the EMA and its update count, and the cosine learning-rate schedule.
SMALL_EVAL = ["eval.num_samples=200", "eval.repeats=1", "eval.plot=false"]


def overrides(*items: str) -> list[str]:
    """["--set", item, "--set", item, ...]"""
    return [arg for item in items for arg in ("--set", item)]


COMMAND = [
    sys.executable, "-m", "rewardtune", "run", str(TINY),
    *overrides(
        f"train.steps={STEPS}", "train.checkpoint_every=10", *SMALL_EVAL, "reward.share_with_value=false",
        "reward.hidden=32", "reward.depth=2", "train.ema_decay=0.9", "train.lr_schedule=cosine",
    ),
]


def start(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [*COMMAND, "--out", str(out), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def latest_step(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    except (OSError, ValueError):  # not written yet (os.replace makes it appear whole)
        return -1


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"))


def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(tmp_path: Path):
    rng = random.Random()
    threshold, delay = rng.choice([20, 30]), rng.uniform(0.0, 0.05)  # kill after checkpoint `threshold`, mid-interval
    where = f"(killed after checkpoint {threshold} + {delay:.3f} s)"
    straight = start(tmp_path / "straight")  # runs alongside the killed one: the results do not depend on timing
    killed = start(tmp_path / "killed")
    deadline = time.monotonic() + 120
    while latest_step(tmp_path / "killed") < threshold:
        assert killed.poll() is None, f"the run ended before it could be killed: {killed.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    time.sleep(delay)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    at_kill = latest_step(tmp_path / "killed")
    assert threshold <= at_kill < STEPS and not (tmp_path / "killed" / "eval.json").exists(), where  # killed mid-run

    resumed = start(tmp_path / "killed", "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"step_{at_kill:08d} (step {at_kill})" in err  # "resumed from <the last checkpoint> (step N)"
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-3000:]

    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert latest_step(tmp_path / "killed") == latest_step(tmp_path / "straight") == STEPS
    assert (
        a.keys() == b.keys() and any(k.startswith("reward.energy.") for k in a) and any(k.startswith("ema.") for k in a)
    )
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs {where}"  # bitwise
    assert json.loads((tmp_path / "killed" / "eval.json").read_text()) == json.loads(
        (tmp_path / "straight" / "eval.json").read_text()
    )


NON_FINITE = {
    # tiny_8gaussians' [reward] holds only its kind, so --set swaps in the faulty plugin (tests/faulty_rewards.py).
    # A reward turning NaN at its 27th call (one call in the step-0 evaluation's reward_mean, then one per step): the
    # run stops in step 26; checkpoint 20 is kept.
    "reward NaN": (
        ["reward.kind=faulty_rewards:build_faulty_reward", 'reward.mode="nan"', "reward.after=26"],
        "reward 'faulty' returned NaN/inf for 32 of 32 samples at step 26",
        20,
    ),
    "reward inf": (
        ["reward.kind=faulty_rewards:build_faulty_reward", 'reward.mode="inf"', "reward.after=13"],
        "reward 'faulty' returned NaN/inf for 32 of 32 samples at step 13",
        10,
    ),
    # a value loss overflowing in the first step: only the step-0 checkpoint exists
    "loss NaN": (["value.lr=1e30"], "value/td_loss became nan at step 1", 0),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_values_stop_the_run_and_keep_the_last_checkpoint(case: str, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    sets, expected, kept = NON_FINITE[case]
    out = tmp_path / "run"
    args = ["run", str(TINY), "--out", str(out), *overrides("train.steps=40", *SMALL_EVAL, *sets)]

    code, _, err = cli(capsys, *args)

    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: {expected}; the last checkpoint is kept"
    root = out / "checkpoints"
    assert ckpt.latest_checkpoint(root) == root / ckpt.checkpoint_name(kept)  # nothing written after the failure
    assert max(int(p.name.removeprefix("step_")) for p in root.glob("step_*")) == kept
    assert not list(root.glob(".tmp_*")) and not list(root.glob(".old_*"))
    weights, state, rng = ckpt.read_checkpoint(root / ckpt.checkpoint_name(kept))
    assert state["step"] == kept and rng is not None
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    code, _, err = cli(capsys, "eval", str(out))  # the kept checkpoint loads and evaluates
    assert code == 0, err
    assert json.loads((out / "eval.json").read_text())["step"] == kept
