"""`rewardtune bench` (bench.py) and the phase clock it reads (phases.py): the JSON's structure, phases that add up
to the iteration, bad input in one line. No timing thresholds: the machine running the tests may be loaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from rewardtune import phases
from rewardtune.bench import PHASES
from rewardtune.phases import NO_PHASES, PhaseClock

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_8gaussians.toml"


def test_bench_writes_a_table_and_json_whose_phases_add_up_to_the_iteration(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(capsys, "bench", TINY, "--steps", "4", "--warmup", "1", "--samples", "64",
                                "--json", out, "--set", "train.ema_decay=0.9")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert {"recipe", "device", "torch", "threads", "num_steps", "batch_size", "steps", "warmup", "ms_per_iteration",
            "iterations_per_s", "sampling", "peak_memory"} <= set(result)
    assert (result["num_steps"], result["batch_size"], result["steps"], result["warmup"]) == (3, 32, 4, 1)
    ms = result["ms_per_iteration"]
    assert list(ms) == [*PHASES, "total"]
    assert all(math.isfinite(v) and v >= 0 for v in ms.values())
    for name in ("rollout", "reward_update", "value_update", "policy_step"):  # a DxMI iteration has each of them
        assert ms[name] > 0
    # The phases split the iteration; the total is clocked around it, so they differ only by the clock's own calls
    # (a loose bound: a preempted process can stall between the two readings).
    assert sum(ms[name] for name in PHASES) == pytest.approx(ms["total"], rel=0.25)
    assert result["iterations_per_s"] == pytest.approx(1000 / ms["total"])
    assert result["sampling"]["samples"] == 64 and result["sampling"]["samples_per_s"] > 0
    assert result["peak_memory"]["rss_bytes"] > 0 and result["peak_memory"]["cuda_allocated_bytes"] is None
    for name in (*PHASES, "total", "sampling", "peak RSS"):  # the table
        assert name in stdout


def test_bench_refuses_a_missing_json_folder_before_it_runs(tmp_path, capsys):
    code, _, err = run_cli(capsys, "bench", TINY, "--steps", "1", "--json", tmp_path / "missing" / "bench.json")
    assert code == 2 and err == f"error: --json: the folder {tmp_path / 'missing'} does not exist\n"


def test_bench_refuses_a_bad_override_in_one_line(capsys):
    code, _, err = run_cli(capsys, "bench", TINY, "--steps", "1", "--set", "train.batch_size=zero")
    assert code == 2 and err == f"error: {TINY}: [train] batch_size: expected an integer, got 'zero' (str)\n"


def test_bench_steps_must_be_positive(capsys):
    code, _, err = run_cli(capsys, "bench", TINY, "--steps", "0")
    assert code == 2 and "Usage:" in err and "--steps" in err


def test_the_phase_clock_counts_each_phase_without_the_phases_inside_it(monkeypatch):
    """A clock that advances by 1 at every reading: the outer phase lasts 9 readings, of which 2 + 3 are its inner
    phases', and every reading is accounted for."""
    readings = iter(range(100))
    monkeypatch.setattr(phases.time, "perf_counter", lambda: float(next(readings)))
    clock = PhaseClock()
    with clock.phase("outer"):  # reads 0
        next(readings)  # 1: work in the outer phase
        with clock.phase("a"):  # reads 2 .. 4
            next(readings)
        with clock.phase("b"):  # reads 5 .. 8
            next(readings), next(readings)
    # outer reads 9 at its end
    assert clock.seconds == {"a": 2.0, "b": 3.0, "outer": 4.0}
    assert sum(clock.seconds.values()) == 9.0


def test_no_phases_times_nothing():
    with NO_PHASES.phase("rollout"), NO_PHASES.phase("rollout"):  # one shared empty context, reentrant
        pass
    assert not hasattr(NO_PHASES, "seconds")


def test_bench_times_the_trained_weights_only_when_asked(tmp_path, capsys, monkeypatch):
    """--trained-weights loads backbone.init_from (a finished run's folder), as a run would; without it the backbone
    keeps the random weights the recipe's seed draws."""
    from rewardtune import api
    from rewardtune.build import build_experiment
    from rewardtune.recipe import load_recipe

    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "run", TINY, "--out", run, "--set", "train.steps=3", "--set", "train.eval_every=0")
    assert code == 0, err
    built = []
    make_trainer = api.make_trainer

    def capture(experiment, *args):  # the weights the benchmark starts from, before its iterations move them
        built.append({k: v.clone() for k, v in experiment.backbone.state_dict().items()})
        return make_trainer(experiment, *args)

    monkeypatch.setattr(api, "make_trainer", capture)
    init = f"backbone.init_from={run}"
    for flags in (["--trained-weights"], []):
        code, _, err = run_cli(capsys, "bench", TINY, "--steps", "1", "--warmup", "0", "--samples", "0",
                               "--json", tmp_path / "bench.json", "--set", init, *flags)
        assert code == 0, err
        weights = json.loads((tmp_path / "bench.json").read_text())["weights"]
        assert weights == ("backbone.init_from" if flags else "random")
    trained, random = built
    loaded = build_experiment(load_recipe(TINY, [init])).backbone.state_dict()
    fresh = build_experiment(load_recipe(TINY, [])).backbone.state_dict()
    assert all(torch.equal(trained[k], loaded[k]) for k in loaded)
    assert all(torch.equal(random[k], fresh[k]) for k in fresh)
    assert any(not torch.equal(loaded[k], fresh[k]) for k in fresh)  # three iterations moved the weights


@pytest.mark.parametrize(("init", "message"), [
    ([], "--trained-weights loads backbone.init_from, and this recipe sets none (add --set backbone.init_from=RUN)"),
    (["--set", "backbone.init_from=ddpm_digits.toml"],
     "backbone.init_from = 'ddpm_digits.toml' names a recipe; run it first and point at its run directory"),
])
def test_bench_trained_weights_need_a_run_folder(capsys, init, message):
    code, _, err = run_cli(capsys, "bench", TINY, "--steps", "1", "--trained-weights", *init)
    assert code == 2 and err == f"error: {message}\n"
