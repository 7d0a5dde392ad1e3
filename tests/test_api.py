"""The Python API shown in README.md: composing the pieces by hand (reproducibly), building a recipe's trainer from
a file or from dicts into run directories the CLI reads, and the README's install-and-test line that CI runs."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from helpers import LinearPolicy, QuadraticCost
from test_cli import cli

import rewardtune as rt
from rewardtune.algorithms.dxdp import DxDP, DxDPConfig
from rewardtune.errors import RecipeError

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
    assert set(result["metrics"]) == {"sliced_wasserstein", "sliced_wasserstein_std", "mode_coverage", "min_mode_mass", "energy_auc"}
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


# ---- the README's examples, reproducibility ------------------------------------------------------------------------
README = ROOT / "README.md"


def readme_python_block(containing: str) -> str:
    """The one ```python block of README.md that contains `containing`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"README.md has {len(found)} python blocks containing {containing!r}"
    return found[0]


def replaced_once(code: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert code.count(old) == 1, f"the README example no longer contains {old!r} once"
        code = code.replace(old, new)
    return code


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=120, check=False)


def test_the_readme_composed_example_gives_the_same_metrics_in_two_fresh_processes(tmp_path: Path):
    code = replaced_once(
        readme_python_block("rt.Trainer("),
        {"steps=2000": "steps=15", "rt.ToyEvaluator(data)": "rt.ToyEvaluator(data, num_samples=400, repeats=2)"},
    )
    results = []
    for _ in range(2):
        done = run_python(code, tmp_path)
        assert done.returncode == 0, done.stderr
        results.append(ast.literal_eval(done.stdout.strip().splitlines()[-1]))
    assert set(results[0]) == {"sliced_wasserstein", "sliced_wasserstein_std", "mode_coverage", "min_mode_mass", "energy_auc"}
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "build",
    [
        lambda: rt.build_mlp_backbone((2,), num_steps=3, hidden=16, depth=1, time_dim=8),
        lambda: rt.build_time_mlp_value((3,), hidden=16, depth=1, time_dim=8),
        lambda: rt.build_energy_reward((2,), None, 3, share_with_value=False, hidden=16, depth=1),
    ],
    ids=["mlp_backbone", "time_mlp_value", "separate_energy"],
)
def test_seed_everything_fixes_the_builders_initial_weights(build):
    def weights_after(seed: int) -> list[torch.Tensor]:
        rt.seed_everything(seed)
        return [p.detach().clone() for p in build().parameters()]

    first, again, other = weights_after(7), weights_after(7), weights_after(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_seed_everything_seeds_python_and_numpy_too():
    import random

    import numpy as np

    draws = []
    for _ in range(2):
        rt.seed_everything(123)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(())), int(np.random.randint(1 << 30))))
    assert draws[0] == draws[1]
    rt.seed_everything(2**40)  # a seed beyond NumPy's 2**32 range is taken modulo 2**32 there, not refused


# ---- recipes from Python, run directories the CLI reads -----------------------------------------------------------
SMALL_EVAL = ["eval.num_samples=300", "eval.repeats=2"]


def readme_tiny_tables() -> dict:
    """The dict the README passes to `rt.make_recipe` as `tiny`."""
    tree = ast.parse(readme_python_block("rt.make_recipe("))
    calls = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "tiny"]
    assert len(calls) == 1
    return ast.literal_eval(calls[0].args[0])


def test_make_recipe_equals_load_recipe_of_the_same_tables():
    path = ROOT / "recipes" / "tiny_8gaussians.toml"
    overrides = ["train.steps=7", "backbone.hidden=24"]
    from_file = rt.load_recipe(path, overrides)
    from_dicts = rt.make_recipe(tomllib.loads(path.read_text()), overrides)
    assert from_dicts.resolved == from_file.resolved
    assert from_dicts.train == from_file.train and from_dicts.plugins == from_file.plugins


@pytest.mark.parametrize(
    ("tables", "fragment"),
    [
        ({"data": {"kind": "8gaussians"}, "backbone": {"kind": "mlp", "hiden": 8}, "algorithm": {"kind": "ddpm"}},
         "unknown key 'hiden' for kind 'mlp' (did you mean 'hidden'?)"),
        ({"data": {"kind": "8gaussians"}, "backbone": {"kind": "mlp"}, "algorithm": {"kind": "ddpm"}, "train": {"steps": None}},
         "recipe train.steps: None (NoneType) is not a TOML value"),
        ({"data": {"kind": "8gaussians"}, "backbone": {"kind": "mlp", "init_from": Path("x")}, "algorithm": {"kind": "ddpm"}},
         "recipe backbone.init_from: PosixPath('x') (PosixPath) is not a TOML value"),
        ({"data": {"kind": "8gaussians"}, "backbone": {"kind": "mlp"}}, "missing table [algorithm]"),
        ({"data": "8gaussians", "backbone": {"kind": "mlp"}, "algorithm": {"kind": "ddpm"}}, "[data] must be a table, got str"),
        ([("data", {"kind": "8gaussians"})], "a recipe is a dict of tables, got list"),
    ],
    ids=["misspelt_key", "none", "path", "missing_table", "not_a_table", "not_a_dict"],
)
def test_make_recipe_refuses_what_a_recipe_file_would_in_one_line(tables, fragment):
    with pytest.raises(RecipeError) as err:
        rt.make_recipe(tables)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_make_recipe_takes_tuples_where_toml_has_lists():
    path = ROOT / "recipes" / "ddpm_digits.toml"
    tables = tomllib.loads(path.read_text())
    unet = tables["backbone"]["unet"]
    unet.update({k: tuple(v) for k, v in unet.items() if isinstance(v, list)})
    assert isinstance(unet["block_out_channels"], tuple)
    assert rt.make_recipe(tables).resolved == rt.load_recipe(path).resolved  # stored as the file's lists


def test_build_trainer_writes_a_run_directory_that_eval_and_sample_read(tmp_path: Path, capsys):
    import numpy as np

    out = tmp_path / "tiny"
    recipe = rt.make_recipe(readme_tiny_tables(), ["train.steps=10", *SMALL_EVAL])
    trainer = rt.build_trainer(recipe, out)
    assert tomllib.loads((out / "recipe.toml").read_text()) == recipe.resolved  # written before training
    result = trainer.fit()
    code, _, err = cli(capsys, "eval", str(out))
    assert code == 0, err
    assert json.loads((out / "eval.json").read_text())["metrics"] == result["metrics"]  # the same checkpoint and seed
    code, _, err = cli(capsys, "sample", str(out), "-n", "32", "-o", str(tmp_path / "s.npz"))
    assert code == 0, err
    assert np.load(tmp_path / "s.npz")["samples"].shape == (32, 2)
    with pytest.raises(RecipeError, match="already holds this run"):  # the checks of `rewardtune run`
        rt.build_trainer(recipe, out)
    with pytest.raises(RecipeError, match="holds a run of a different recipe"):
        rt.build_trainer(rt.make_recipe(readme_tiny_tables(), ["train.steps=11", *SMALL_EVAL]), out)


def test_build_trainer_runs_the_pretraining_recipe_init_from_names(tmp_path: Path, capsys):
    pretrain = tmp_path / "pre.toml"
    pretrain.write_text(
        '[data]\nkind = "8gaussians"\n[backbone]\nkind = "mlp"\nnum_steps = 3\nhidden = 32\n'
        '[algorithm]\nkind = "ddpm"\n[train]\nsteps = 4\nbatch_size = 32\n[eval]\nnum_samples = 200\nrepeats = 1\n'
    )
    tables = readme_tiny_tables()  # its backbone: num_steps = 3, hidden = 32, like the pretraining recipe's
    tables["backbone"]["init_from"] = str(pretrain)
    out = tmp_path / "run"
    reporter = Recorder()
    trainer = rt.build_trainer(rt.make_recipe(tables, ["train.steps=3", *SMALL_EVAL]), out, reporter=reporter)
    assert json.loads((out / "pretrain" / "eval.json").read_text())["step"] == 4
    assert any("pretraining: pre.toml" in m for m in reporter.messages)
    trainer.fit()
    assert reporter.started == [(4, 0, "training"), (3, 0, "training")]  # progress of both stages
    code, _, err = cli(capsys, "eval", str(out))
    assert code == 0, err


class Recorder:
    """A Reporter that records what it is told."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.started: list[tuple[int, int, str]] = []

    def start(self, total: int, done: int, description: str) -> None:
        self.started.append((total, done, description))

    def advance(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def message(self, text: str) -> None:
        self.messages.append(text)

    def stop(self) -> None:
        pass


@pytest.mark.parametrize("command", [("eval",), ("sample", "-n", "4", "-o", "s.npz")], ids=["eval", "sample"])
def test_the_cli_says_in_one_line_why_a_hand_composed_run_directory_cannot_be_read(tmp_path: Path, capsys, command):
    data = rt.EightGaussians()
    backbone = rt.build_mlp_backbone((2,), num_steps=2, hidden=16, depth=1, time_dim=8)
    trainer = rt.Trainer(
        backbone=backbone, algorithm=rt.DDPMPretrain(backbone, lr=1e-3), reward=None, data=data,
        evaluator=rt.ToyEvaluator(data, num_samples=200, repeats=1), config=rt.TrainConfig(steps=2, batch_size=16),
        out_dir=tmp_path / "hand",
    )
    trainer.fit()
    code, _, err = cli(capsys, command[0], str(tmp_path / "hand"), *command[1:])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: ") and "a Trainer composed in Python wrote it" in lines[0]
    assert "rewardtune.build_trainer(recipe, out_dir)" in lines[0]


# ---- the two install-and-run commands ----------------------------------------------------------------------------
def test_ci_runs_exactly_the_readme_test_line():
    quick_start = README.read_text().split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("  #")[0].strip() for line in quick_start.splitlines() if line.strip()]
    assert len(commands) == 2, "the README's quick start is two commands: the main job, and the tests"
    assert commands[0].startswith("python3 -m pip install") and "rewardtune run" in commands[0]
    test_line = commands[1]
    assert test_line.startswith("python3 -m pip install") and test_line.endswith("&& python3 -m pytest")
    for plugin in sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file()):
        assert f"-e plugins/{plugin}" in test_line  # every example plugin the tests use is installed
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == [test_line]


def test_the_offline_switch_is_set_even_when_huggingface_hub_was_imported_first(tmp_path: Path):
    probe = (
        "import os, runpy; os.environ.pop('HF_HUB_OFFLINE', None)\n"
        "import huggingface_hub.constants as constants\n"
        "assert not constants.HF_HUB_OFFLINE\n"
        f"runpy.run_path({str(ROOT / 'tests' / 'conftest.py')!r})\n"
        "import subprocess, sys\n"
        "child = subprocess.run([sys.executable, '-c', 'import huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)'],"
        " capture_output=True, text=True, check=True).stdout.strip()\n"
        "print(os.environ['HF_HUB_OFFLINE'], constants.HF_HUB_OFFLINE, child)\n"
    )
    done = run_python(probe, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "True", "True"]  # this process and its subprocesses are offline


# ---- vector evaluation with an external reward, CPU threads -------------------------------------------------------
def point_policy(point: list[float], sigma: float = 1e-3) -> LinearPolicy:
    """A one-step policy whose samples are `point` + N(0, sigma^2 I)."""
    return LinearPolicy((2,), torch.zeros(1), torch.tensor([point]), torch.tensor([sigma]), sigma_floor=sigma)


class RewardWithItsOwnMetric(QuadraticCost):
    """A fixed reward that also reports the fraction of samples within 1 of its target."""

    def evaluation_metrics(self, x: torch.Tensor) -> dict[str, float]:
        return {"near_target_fraction": float(((x - self.target).norm(dim=1) < 1).float().mean())}


@pytest.mark.parametrize(
    ("point", "target"), [([1.5, 0.0], [0.0, 0.0]), ([3.0, -1.0], [1.0, 1.0]), ([0.5, 0.5], [0.5, 0.5])]
)
def test_vector_evaluation_reports_the_mean_of_an_external_reward(point, target):
    evaluator = rt.ToyEvaluator(rt.EightGaussians(), num_samples=500, repeats=2, num_projections=50)
    reward = RewardWithItsOwnMetric(torch.tensor(target))
    metrics = evaluator.evaluate(point_policy(point), reward, seed=0)
    expected = -0.5 * sum((p - t) ** 2 for p, t in zip(point, target, strict=True))  # r(x) = -||x - m||^2 / 2
    assert metrics["reward_mean"] == pytest.approx(expected, abs=1e-2)
    near = sum((p - t) ** 2 for p, t in zip(point, target, strict=True)) < 1
    assert metrics["near_target_fraction"] == float(near)
    assert "energy_auc" not in metrics
    assert evaluator.metric_names(reward) == set(metrics)


def test_vector_evaluation_of_a_learned_energy_has_no_reward_mean():
    value = rt.build_time_mlp_value((2,), hidden=8, depth=1, time_dim=4)
    energy = rt.build_energy_reward((2,), value, 1)
    evaluator = rt.ToyEvaluator(rt.EightGaussians(), num_samples=200, repeats=1, num_projections=20)
    metrics = evaluator.evaluate(point_policy([0.0, 0.0]), energy, seed=0)
    assert set(metrics) == {"sliced_wasserstein", "sliced_wasserstein_std", "mode_coverage", "min_mode_mass", "energy_auc"} == evaluator.metric_names(energy)


def test_eval_json_of_a_vector_run_with_a_plugin_reward_has_reward_mean(tmp_path: Path, capsys):
    tables = readme_tiny_tables()
    tables["reward"] = {"kind": "faulty_rewards:build_faulty_reward", "mode": "ok"}  # r(x) = -| ||x|| - 2 |
    out = tmp_path / "ring"
    rt.build_trainer(rt.make_recipe(tables, ["train.steps=3", *SMALL_EVAL]), out).fit()
    code, _, err = cli(capsys, "eval", str(out))
    assert code == 0, err
    saved = json.loads((out / "eval.json").read_text())
    for metrics in (saved["metrics"], saved["initial_metrics"]):
        assert metrics["reward_mean"] <= 0  # a distance to the ring, negated


def test_a_broken_external_reward_fails_vector_evaluation_in_one_line():
    from faulty_rewards import build_faulty_reward

    from rewardtune.errors import PluginError

    evaluator = rt.ToyEvaluator(rt.EightGaussians(), num_samples=100, repeats=1, num_projections=10)
    with pytest.raises(PluginError, match=r"returned shape \(100, 1\) for a batch of 100"):
        evaluator.evaluate(point_policy([0.0, 0.0]), build_faulty_reward((2,), mode="shape"), seed=0)


# ---- the 8-Gaussians plot ----------------------------------------------------------------------------------------
def plot_texts(fig) -> tuple[str, list[str], int]:
    """(title, legend labels, number of colour bars) of a ToyEvaluator figure."""
    ax = fig.axes[0]
    return ax.get_title(), [t.get_text() for t in ax.get_legend().get_texts()], len(fig.axes) - 1


@pytest.mark.parametrize(
    ("point", "outside"), [([0.0, 0.0], 0), ([6.0, 0.0], 2000), ([0.0, -4.5], 2000), ([4.1, 0.0], None)],
    ids=["inside", "right", "below", "on_the_edge"],
)
def test_the_plot_counts_samples_outside_its_window(point, outside):
    import matplotlib.pyplot as plt

    from rewardtune.evaluation import PLOT_SAMPLES, outside_window

    evaluator = rt.ToyEvaluator(rt.EightGaussians())
    policy = point_policy(point, sigma=1e-3 if outside is not None else 0.3)
    if outside is None:  # about half of the samples cross x = 4.1: count them independently of the plot
        from rewardtune.evaluation import generators

        _, gen = generators(5, policy.device)
        outside = int((evaluator.draw(policy, PLOT_SAMPLES, gen)[:, 0] > 4.1).sum())
        assert 0 < outside < PLOT_SAMPLES
    fig = evaluator.figure(policy, None, seed=5, title="step 7")
    title, labels, colour_bars = plot_texts(fig)
    plt.close(fig)
    assert colour_bars == 0 and labels[:2] == ["data", "samples"]
    if outside:
        assert title == f"step 7\n{outside} of {PLOT_SAMPLES} samples outside [-4.1, 4.1]² (crosses at the border)"
        assert labels[2] == f"{outside} outside, drawn at the border"
    else:
        assert title == "step 7" and len(labels) == 2
    assert outside_window(torch.tensor([[4.1, -4.1], [4.2, 0.0], [0.0, -4.11]]), 4.1).tolist() == [False, True, True]


def test_the_energy_plot_has_a_colour_bar_and_a_legend(tmp_path: Path):
    import matplotlib.pyplot as plt

    value = rt.build_time_mlp_value((2,), hidden=8, depth=1, time_dim=4)
    energy = rt.build_energy_reward((2,), value, 1)
    evaluator = rt.ToyEvaluator(rt.EightGaussians())
    fig = evaluator.figure(point_policy([0.0, 1.0]), energy, seed=0)
    title, labels, colour_bars = plot_texts(fig)
    assert colour_bars == 1 and "energy" in fig.axes[1].get_ylabel()
    assert labels == ["samples"] and title == "samples over the energy"
    plt.close(fig)
    evaluator.plot(point_policy([0.0, 1.0]), energy, tmp_path / "p.png", seed=0)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- train.cpu_threads (the `restore_threads` fixture is conftest.py's) ------------------------------------------
class Parameters(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n))


@pytest.mark.parametrize(
    ("setting", "omp", "parameters", "cores", "processes", "expected"),
    [
        (3, "", 10, 16, 1, 3),  # a count is taken as it is
        (0, "", 10, 16, 1, 0),  # 0: torch's default
        ("auto", "2", 10**6, 16, 1, 2),  # OMP_NUM_THREADS (torchrun sets 1) wins
        ("auto", "", 50_000, 16, 1, 1),  # a small sampler: one thread
        ("auto", "", 600_000, 16, 1, 4),  # a larger one: at most 4
        ("auto", "", 600_000, 2, 1, 2),
        ("auto", "", 600_000, 16, 8, 2),  # the machine's cores shared among its training processes
        ("auto", "", 600_000, 2, 3, 1),
    ],
)
def test_cpu_thread_count(monkeypatch, setting, omp, parameters, cores, processes, expected):
    from rewardtune.cpu_threads import cpu_thread_count

    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert cpu_thread_count(setting, Parameters(parameters), processes) == expected


def test_the_default_cpu_threads_gives_a_small_network_one_thread(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    data = rt.EightGaussians()
    backbone = rt.build_mlp_backbone((2,), num_steps=2, hidden=16, depth=1, time_dim=8)
    rt.Trainer(backbone=backbone, algorithm=rt.DDPMPretrain(backbone, lr=1e-3), reward=None, data=data,
               evaluator=rt.ToyEvaluator(data), config=rt.TrainConfig())
    assert rt.TrainConfig().cpu_threads == "auto" and torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ['"fast"', "1.5", "true", "-1"])
def test_a_bad_cpu_threads_is_one_line(value):
    with pytest.raises(RecipeError) as err:
        rt.load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml", [f"train.cpu_threads={value}"])
    assert "cpu_threads" in str(err.value) and ("an integer or 'auto'" in str(err.value) or ">= 0" in str(err.value))
