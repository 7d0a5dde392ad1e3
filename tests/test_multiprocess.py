"""Two CPU processes under accelerate: parameters stay identical on every rank, the CLI run checkpoints and
finishes without hanging, and a run stopped by SIGTERM resumes to exactly the uninterrupted result."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no",
]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
STEPS = 30
RUN = [  # the CLI run of the SIGTERM test and of its uninterrupted twin
    "-m", "rewardtune", "run", "recipes/tiny_8gaussians.toml", "--set", f"train.steps={STEPS}", "--set", "train.log_every=1",
    "--set", "eval.num_samples=200", "--set", "eval.repeats=1", "--set", "eval.plot=false",
]


def finished_then_aborted(result: subprocess.CompletedProcess, out: Path) -> bool:
    """The known open defect (docs/reliability.md): after both ranks wrote their verdicts, a gloo thread can abort a
    worker at interpreter shutdown ("terminate called without an active exception", exit -6; about 1 run in 15 on
    the loaded 2-core machine). The computation being checked is complete; the exit code is not."""
    aborted = "terminate called without an active exception" in result.stderr
    return aborted and all((out / f"verdict_rank{r}.json").is_file() for r in range(2))


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the launcher's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 2-process CLI run."""
    out = tmp_path_factory.mktemp("mp") / "straight"
    result = launch(*RUN, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_processes_keep_parameters_identical(tmp_path: Path):
    out = tmp_path / "mp"
    result = launch("tests/multiprocess_check.py", "recipes/tiny_8gaussians.toml", str(out))
    assert result.returncode == 0 or finished_then_aborted(result, out), result.stderr[-3000:]
    verdicts = [json.loads((out / f"verdict_rank{r}.json").read_text()) for r in range(2)]
    assert [v["world_size"] for v in verdicts] == [2, 2]
    assert all(v["identical_to_rank0"] and v["step"] == 20 for v in verdicts)


def test_cli_runs_under_accelerate_and_checkpoints(straight: Path):
    out = straight
    assert json.loads((out / "eval.json").read_text())["step"] == STEPS
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "rng_rank0.pt", "rng_rank1.pt", "state.pt"]


def test_sigterm_stops_both_ranks_at_one_checkpoint_and_resume_is_exact(straight: Path, tmp_path: Path):
    """SIGTERM to one worker (rank 1): Trainer.should_stop all-reduces the request, so both ranks checkpoint the same
    step and exit 143; `accelerate launch` (torchrun) then reports the failed workers and exits 1. --resume under
    accelerate ends bitwise equal to the uninterrupted 2-process run. (Before should_stop kept a request that
    arrived while its rank waited in the all-reduce, about one run in three ignored the signal.)"""
    out = tmp_path / "stopped"
    launcher = subprocess.Popen(
        [*LAUNCH, *RUN, "--out", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        log, deadline = out / "metrics.jsonl", time.monotonic() + 120
        while not (log.exists() and log.read_text().count("\n") >= 2):  # both ranks are in the loop (handlers set)
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.01)
        workers = {rank_of(pid): pid for pid in children(launcher.pid)}
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    stopped = re.findall(r"stopped by SIGTERM at step (\d+); a checkpoint was written", err)
    assert stopped and len(set(stopped)) == 1, err[-3000:]  # the ranks stopped at the same step
    step = int(stopped[0])
    assert 0 < step < STEPS
    assert launcher.returncode == 1  # torchrun's verdict on workers that exited non-zero
    # Workers exit 143. When the first has exited, torchrun sends SIGTERM to the other, which may then be reported
    # as -15 if it has already left the training loop (default handlers) but not yet exited: after the checkpoint.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", err)
    assert "143" in codes and set(codes) <= {"143", "-15"}, err[-3000:]
    checkpoint = out / "checkpoints" / f"step_{step:08d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.safetensors", "rng_rank0.pt", "rng_rank1.pt", "state.pt"]
    assert not (out / "eval.json").exists()

    result = launch(*RUN, "--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(step {step})" in result.stderr  # resumed from the SIGTERM checkpoint
    a, b = final_weights(straight), final_weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise
    assert json.loads((out / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())


def test_a_signal_handled_during_the_stop_all_reduce_is_not_lost(monkeypatch):
    """The race behind the test above, made deterministic: SIGTERM handled while this rank waits in should_stop's
    status exchange (the other rank saw no signal) must stop both ranks at the next iteration, not be overwritten."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from rewardtune.trainer import Trainer

    trainer = SimpleNamespace(stop_signal=None, device="cpu", step=3)

    def all_reduce(status, op=None, async_op=False):  # the other rank's status equals this one's; the signal arrives meanwhile
        trainer.stop_signal = signal.SIGTERM

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert Trainer.should_stop(trainer, (0, 10)) is False  # the ranks agreed on "go on" this iteration ...
    assert trainer.stop_signal == signal.SIGTERM  # ... and the request is kept
    monkeypatch.setattr(dist, "all_reduce", lambda status, op=None, async_op=False: None)  # next iteration: the status carries it
    assert Trainer.should_stop(trainer, (0, 10)) is True


# ---- agreement: rank-dependent inputs at every branch point (rewardtune/agreement.py) ---------------------------
AGREEMENT_ENV = {**ENV, "PYTHONPATH": "tests"}
SCENARIOS = ["issue", "noisy_eval", "nan_reward", "nan_metric", "eval_raises", "checkpoint_fails", "extra_collective"]


def launch_in_own_group(args: list[str], timeout: float) -> tuple[int, str]:
    """Run `accelerate launch ARGS` in a process group of its own; on timeout (processes that wait for each other
    forever) kill the whole group and fail. Returns (exit code, stderr)."""
    launcher = subprocess.Popen(
        [*LAUNCH, *args], cwd=ROOT, env=AGREEMENT_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        _, err = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in children(launcher.pid):  # torchrun starts each worker in a session of its own
            os.kill(pid, signal.SIGKILL)
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail(f"accelerate launch {' '.join(args[:2])} did not finish in {timeout} s: the ranks hang")
    return launcher.returncode, err


@pytest.fixture(scope="module")
def agreement_runs(tmp_path_factory) -> Path:
    """Every scenario of tests/multiprocess_agreement.py, one after another in one 2-process launch."""
    out = tmp_path_factory.mktemp("agreement")
    code, err = launch_in_own_group(["tests/multiprocess_agreement.py", str(out), *SCENARIOS], timeout=240)
    (out / "launch.log").write_text(err)
    assert code == 0, f"{out / 'launch.log'}: {err[-3000:]}"
    return out


def verdicts(root: Path, scenario: str) -> list[dict]:
    return [json.loads((root / scenario / f"rank{r}.json").read_text()) for r in range(2)]


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


@pytest.mark.parametrize("scenario", ["issue", "noisy_eval"])
def test_ranks_that_would_rank_checkpoints_differently_keep_the_same_best(agreement_runs: Path, scenario: str):
    """issue: composite reward, normalize = true, keep_best = reward_mean, eval_every = 1 (the issue's reproduction;
    the trainer before the fix hangs on it). noisy_eval: evaluation n adds +10 n to rank 0's reward and -10 n to rank
    1's, so each rank alone would keep another checkpoint. Both ranks finish, with the main process's metrics, best
    step and checkpoints, and the same composite statistics."""
    run_dir = agreement_runs / scenario
    rank0, rank1 = verdicts(agreement_runs, scenario)
    assert rank0["error"] is None and rank1["error"] is None
    assert rank0["result"] == rank1["result"] == json.loads((run_dir / "eval.json").read_text())
    assert rank0["best"] == rank1["best"] == json.loads((run_dir / "checkpoints" / "best" / "best.json").read_text())
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    best = max(evals, key=lambda e: e["eval"]["reward_mean"])  # the periodic evaluations the main process logged
    assert rank0["best"] == {"step": best["step"], "metric": "reward_mean", "value": best["eval"]["reward_mean"]}
    assert rank0["identical_to_rank0"] and rank1["identical_to_rank0"]
    assert rank0["running_mean"] == rank1["running_mean"] and rank0["running_var"] == rank1["running_var"]
    assert latest_step(run_dir) == rank0["step"] == rank1["step"] == 4


@pytest.mark.parametrize(
    ("scenario", "error", "last_good"),
    [
        ("nan_reward", "PluginError: reward 'rank' returned NaN/inf for 16 of 16 samples at step 3*(on rank 1 of 2)", 2),
        ("nan_metric", "NonFiniteError: rank/fake_reward became nan at step 3*(on rank 1 of 2)", 2),
        ("eval_raises", "PluginError: *rank reward failed on evaluation call 3*(on rank 1 of 2)", 1),  # step 2's
        # an OSError's message has two parts: it does not name the rank
        ("checkpoint_fails", "OSError: [[]Errno 28] No space left on device", 1),  # rank 1 cannot write at step 2
        ("extra_collective", "DisagreementError: the processes disagree at an all_mean: the dtype is *", 2),
    ],
)
def test_a_failure_on_one_rank_is_the_same_error_on_both(agreement_runs: Path, scenario: str, error: str, last_good: int):
    """Rank 1 alone: a NaN reward, a NaN training metric, a reward raising in evaluation, a checkpoint it cannot write,
    one collective more than rank 0. Both ranks raise the same error (naming rank 1 when it is rank 1's), the last
    checkpoint before the failure is kept, and the process group still works afterwards (the next scenario ran)."""
    rank0, rank1 = verdicts(agreement_runs, scenario)
    assert rank0["error"] == rank1["error"] and fnmatch.fnmatchcase(rank0["error"], error), rank0["error"]
    assert rank0["identical_to_rank0"] and rank1["identical_to_rank0"]
    assert latest_step(agreement_runs / scenario) == last_good
    assert not (agreement_runs / scenario / "eval.json").exists()


def test_cli_a_reward_raising_on_one_rank_stops_both_with_the_same_error_line(tmp_path: Path):
    """`rewardtune run` under accelerate, a reward plugin raising RuntimeError on rank 1's third training call: both
    ranks print the same one-line error (the plugin named, rank 1 named) and exit 2, no hang, and the last checkpoint
    (step 2) is kept."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from multiprocess_agreement import BASE
    finally:
        sys.path.pop(0)
    recipe = tmp_path / "raise.toml"
    recipe.write_text(BASE.replace('mode = "noisy_eval"', 'mode = "raise"\nat = 3'))
    code, err = launch_in_own_group(["-m", "rewardtune", "run", str(recipe), "--out", str(tmp_path / "run")], timeout=120)
    lines = [line for line in err.splitlines() if "rank reward failed" in line]
    assert len(lines) == 2 and lines[0] == lines[1], err[-3000:]
    assert lines[0].startswith("error: ") and lines[0].endswith("(on rank 1 of 2)"), lines[0]
    # torchrun's verdict is 1. The workers exit 2 after the error line; sometimes a gloo thread still aborts the
    # interpreter's shutdown after it (-6, "terminate called without an active exception", a known open defect of
    # the error path, docs/reliability.md), which changes only the workers' exit codes, not what they printed.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", err)
    assert code == 1 and codes and set(codes) <= {"2", "-6", "-15"}, err[-3000:]
    assert latest_step(tmp_path / "run") == 2


def test_per_condition_advantage_statistics_agree_across_ranks(tmp_path: Path):
    """Each rank draws its own prompts, but the per-prompt return buffers are filled from both ranks' returns, so
    both ranks standardise with the same statistics."""
    result = launch("tests/multiprocess_conditions.py", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"conditions_rank{r}.json").read_text())["buffers"] for r in (0, 1)]
    assert ranks[0] == ranks[1] and set(ranks[0]) == {"left", "right", "up", "down"}


def test_the_shipped_accelerate_configs_load_and_the_cpu_one_runs(tmp_path: Path):
    """recipes/accelerate/*.yaml are accelerate config files (data parallel, or FSDP2 for the fsdp*.yaml ones, whose
    2-process run test_latent.py tests); the 2-process CPU one runs the tiny recipe with identical parameters on both
    ranks."""
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        expected = "FSDP" if path.name.startswith("fsdp") else "MULTI_GPU"
        assert config.distributed_type.name == expected and config.mixed_precision == "no", path.name
        if expected == "FSDP":
            assert config.fsdp_config["fsdp_version"] == 2, path.name
    out = tmp_path / "mp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/multi_cpu.yaml",
               "tests/multiprocess_check.py", "recipes/tiny_8gaussians.toml", str(out), "train.steps=3"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 or finished_then_aborted(result, out), result.stderr[-3000:]
    verdicts = [json.loads((out / f"verdict_rank{r}.json").read_text()) for r in range(2)]
    assert all(v["identical_to_rank0"] and v["world_size"] == 2 for v in verdicts)


def test_a_launch_precision_the_recipe_does_not_apply_is_refused():
    from types import SimpleNamespace

    from rewardtune.errors import RecipeError
    from rewardtune.trainer import check_launch_precision

    with pytest.raises(RecipeError, match="launched with mixed_precision 'bf16' but the recipe's train.mixed_precision is 'no'"):
        check_launch_precision(SimpleNamespace(mixed_precision="bf16"), "no")
    check_launch_precision(SimpleNamespace(mixed_precision="bf16"), "bf16")
    check_launch_precision(SimpleNamespace(mixed_precision="no"), "fp16")


def test_two_processes_train_the_anomaly_recipe_identically(tmp_path: Path):
    """The MVTec recipe on a synthetic folder under 2 processes: each rank extracts the features and pretrains the
    autoencoder energy (and the prior's frozen copy) itself; every parameter, the prior's included, ends identical on
    both ranks, and keep_best on image_auroc keeps one best checkpoint."""
    from rewardtune.anomaly.sets import write_mvtec_layout

    root = write_mvtec_layout(tmp_path / "mvtec", categories=("bottle", "grid"), size=32)
    out = tmp_path / "mp"
    tiny = [f"data.root={root}", "data.extractor=efficientnet_b0", "data.pretrained=false", "data.image_size=32",
            "data.grid=4", "data.cache=false", "backbone.hidden=32", "value.hidden=32", "reward.latent=8",
            "reward.hidden=32", "reward.pretrain_steps=20", "reward.pretrain_batch=64", "train.steps=6",
            "train.batch_size=32", "algorithm.policy_batch=32", "train.eval_every=3", "train.checkpoint_every=3",
            "eval.num_samples=64"]
    result = launch("tests/multiprocess_check.py", "recipes/dxmi_mvtec.toml", str(out), *tiny)
    assert result.returncode == 0 or finished_then_aborted(result, out), result.stderr[-3000:]
    verdicts = [json.loads((out / f"verdict_rank{r}.json").read_text()) for r in range(2)]
    assert all(v["identical_to_rank0"] and v["step"] == 6 and v["world_size"] == 2 for v in verdicts)
    assert (out / "checkpoints" / "best").is_dir()


@pytest.mark.parametrize("variant", [[], ["algorithm.encoder=false"], ["backbone.num_steps=1", "backbone.latent_dim=0"]],
                         ids=["jeffrey", "no-encoder", "T1-z0"])
def test_two_processes_train_ddaebm_identically(tmp_path: Path, variant: list[str]):
    """DDAEBM's teacher-forced step under 2 processes (each rank draws its own forward pairs from its own data stream):
    the generator, the encoder (when there is one), the per-level energy and the EMA copy end identical on both ranks,
    so both of its gradient steps (the energy's; the generator's with the encoder's) are averaged across ranks, in the
    ablations' configurations too."""
    out = tmp_path / "mp"
    result = launch("tests/multiprocess_check.py", "recipes/ddaebm_8gaussians.toml", str(out), "train.steps=6",
                    "train.eval_every=3", "train.checkpoint_every=3", "train.batch_size=32", "eval.num_samples=200",
                    "eval.repeats=1", *variant)
    assert result.returncode == 0 or finished_then_aborted(result, out), result.stderr[-3000:]
    verdicts = [json.loads((out / f"verdict_rank{r}.json").read_text()) for r in range(2)]
    assert all(v["identical_to_rank0"] and v["step"] == 6 and v["world_size"] == 2 for v in verdicts)
