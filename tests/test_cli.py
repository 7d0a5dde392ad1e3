"""The console script end to end: a short recipe runs, and bad input exits 2 with one line on stderr (the table of
bad inputs is tests/test_bad_inputs.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli

cli = run_cli  # the name the other test modules import (`from test_cli import cli`)

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--set", "train.batch_size=32", "--set", "eval.num_samples=500", "--set", "eval.repeats=2",
    "--set", "train.log_every=5", "--set", "train.checkpoint_every=10",
]




def rewardtune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the console script in a subprocess, as a user would."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rewardtune", *args], capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def dxmi_run(tmp_path_factory) -> Path:
    """A tiny DxMI run (pretraining included) through the console entry point."""
    out = tmp_path_factory.mktemp("runs") / "dxmi"
    result = rewardtune(
        "run", "recipes/dxmi_8gaussians.toml", "--out", str(out), "--steps", "20",
        "--set", "algorithm.value_warmup=5", "--set", "train.eval_every=10", *TINY,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_run_writes_the_run_directory(dxmi_run: Path):
    for name in ("recipe.toml", "metrics.jsonl", "eval.json", "samples.png", "samples_step0.png"):
        assert (dxmi_run / name).is_file(), name
    result = json.loads((dxmi_run / "eval.json").read_text())
    assert result["step"] == 20
    assert set(result["metrics"]) == {"sliced_wasserstein", "sliced_wasserstein_std", "mode_coverage", "min_mode_mass", "energy_auc"}
    assert set(result["initial_metrics"]) == set(result["metrics"])
    assert all(isinstance(v, float) for v in result["metrics"].values())
    lines = [json.loads(line) for line in (dxmi_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval" not in r] == [5, 10, 15, 20]
    assert (dxmi_run / "pretrain" / "eval.json").is_file()
    assert (dxmi_run / "checkpoints" / "latest").read_text().strip() == "step_00000020"


def test_eval_and_sample(dxmi_run: Path, tmp_path: Path):
    import numpy as np

    result = rewardtune("eval", str(dxmi_run))
    assert result.returncode == 0, result.stderr
    assert json.loads((dxmi_run / "eval.json").read_text())["step"] == 20
    out = tmp_path / "s.npz"
    result = rewardtune("sample", str(dxmi_run), "-n", "64", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert np.load(out)["samples"].shape == (64, 2)


def test_eval_of_a_kept_step_and_of_the_raw_weights(dxmi_run: Path):
    """--step evaluates a kept checkpoint and --raw the trained weights instead of their EMA, each into a file of its
    own (eval.json stays the final EMA evaluation); a step that was not kept is a one-line error."""
    before = json.loads((dxmi_run / "eval.json").read_text())
    result = rewardtune("eval", str(dxmi_run), "--step", "10", "--raw")
    assert result.returncode == 0, result.stderr
    raw = json.loads((dxmi_run / "eval_step10_raw.json").read_text())
    assert raw["step"] == 10 and (dxmi_run / "samples_step10_raw.png").is_file()
    result = rewardtune("eval", str(dxmi_run), "--raw")
    assert result.returncode == 0, result.stderr
    raw_final = json.loads((dxmi_run / "eval_raw.json").read_text())
    assert raw_final["step"] == 20
    # EMA (decay 0.999 with its warm-up) and raw weights differ after 20 steps, and so do their samples
    assert raw_final["metrics"]["sliced_wasserstein"] != before["metrics"]["sliced_wasserstein"]
    assert json.loads((dxmi_run / "eval.json").read_text()) == before
    result = rewardtune("eval", str(dxmi_run), "--step", "7")
    assert result.returncode == 2
    assert "keeps no checkpoint of step 7" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_resume_continues_to_more_steps(dxmi_run: Path, tmp_path: Path):
    """A finished 20-step run, resumed with --steps 30 (a changed recipe, hence --force), trains steps 21-30."""
    run = tmp_path / "run"
    shutil.copytree(dxmi_run, run)
    result = rewardtune(
        "run", "recipes/dxmi_8gaussians.toml", "--out", str(run), "--steps", "30", "--resume", "--force",
        "--set", "algorithm.value_warmup=5", "--set", "train.eval_every=10", *TINY,
    )
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and "(step 20)" in result.stderr
    assert json.loads((run / "eval.json").read_text())["step"] == 30
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 30 and steps == sorted(steps)


def test_plugins_lists_builtins():
    result = rewardtune("plugins")
    assert result.returncode == 0, result.stderr
    rows = {tuple(cell.strip() for cell in line.split("│")[1:3]) for line in result.stdout.splitlines() if "│" in line}
    for row in [("backbone", "mlp"), ("backbone", "ddpm"), ("backbone", "edm"), ("value", "time_mlp"),
                ("reward", "energy"), ("algorithm", "dxdp"), ("algorithm", "ddpm"), ("algorithm", "distill"),
                ("algorithm", "policy_gradient"), ("data", "8gaussians")]:
        assert row in rows, row


def recipe_with(tmp_path: Path, patch: str) -> Path:
    """The DxMI recipe with the tables of `patch` replacing its own; a patch that is not TOML is the whole file."""
    import tomllib

    import tomli_w

    try:
        raw = {**tomllib.loads((ROOT / "recipes" / "dxmi_8gaussians.toml").read_text()), **tomllib.loads(patch)}
        text = tomli_w.dumps(raw)
    except tomllib.TOMLDecodeError:
        text = patch
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


def test_console_script_reports_bad_input_without_traceback(tmp_path: Path):
    result = rewardtune("run", str(recipe_with(tmp_path, "[train]\nstesp = 1\n")))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'bad.toml'}: [train] unknown key 'stesp' (did you mean 'steps'?)"
    ]


def test_report_tables_a_folder_of_runs(dxmi_run: Path, tmp_path: Path, capsys):
    import shutil

    shutil.copytree(dxmi_run, tmp_path / "dxmi_s0", ignore=shutil.ignore_patterns("checkpoints", "pretrain"))
    (tmp_path / "wall_times.txt").write_text("dxmi_s0 12.5\n")
    code, out, err = run_cli(capsys, "report", str(tmp_path), "--curves", str(tmp_path / "c.png"))
    assert code == 0, err
    assert "| dxmi_s0 | 20 |" in out and "| 12 |" in out  # the row and its wall time (12.5 s, rounded to even)
    assert "| dxmi | 1 |" in out  # the per-recipe summary
    assert (tmp_path / "c.png").is_file()
    code, _, err = run_cli(capsys, "report", str(tmp_path / "nothing"))
    assert code == 2 and "is not a folder" in err
