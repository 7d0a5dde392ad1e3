"""Two CPU processes under accelerate: parameters stay identical on every rank, and the CLI run checkpoints and
finishes without hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no",
]


def launch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*LAUNCH, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_keep_parameters_identical(tmp_path: Path):
    out = tmp_path / "mp"
    result = launch("tests/multiprocess_check.py", "recipes/tiny_8gaussians.toml", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    verdicts = [json.loads((out / f"verdict_rank{r}.json").read_text()) for r in range(2)]
    assert [v["world_size"] for v in verdicts] == [2, 2]
    assert all(v["identical_to_rank0"] and v["step"] == 20 for v in verdicts)


def test_cli_runs_under_accelerate_and_checkpoints(tmp_path: Path):
    out = tmp_path / "cli"
    result = launch("-m", "rewardtune", "run", "recipes/tiny_8gaussians.toml", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "eval.json").read_text())["step"] == 20
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "rng_rank0.pt", "rng_rank1.pt", "state.pt"]
