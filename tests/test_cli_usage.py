"""The command line itself: usage errors exit 2 with a usage line, help and version exit 0, help texts read as
written, Ctrl-C outside training exits 130, and no option is silently ignored (a note or an error says so)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_cli import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_8gaussians.toml")
SETS = ["--set", "train.steps=2", "--set", "eval.num_samples=50", "--set", "eval.repeats=1", "--set", "eval.plot=false"]

USAGE_ERRORS = {  # click/typer's own errors, before any rewardtune code runs
    "not an integer": (["run", TINY, "--steps", "abc"], "run", "Invalid value for '--steps'"),
    "below the minimum": (["sample", "RUN", "-n", "0"], "sample", "Invalid value for '-n'"),
    "negative step": (["eval", "RUN", "--step", "-1"], "eval", "Invalid value for '--step'"),
    "not a number": (["sample", "RUN", "--guidance", "high"], "sample", "Invalid value for '--guidance'"),
    "missing argument": (["run"], "run", "Missing argument 'RECIPE'"),
    "unknown command": (["trian"], "", "No such command 'trian'"),
    "unknown option": (["run", TINY, "--stesp", "3"], "run", "No such option: --stesp"),
    "missing option value": (["run", TINY, "--out"], None, "Option '--out' requires an argument"),
    "extra argument": (["eval", "RUN", "OTHER"], "eval", "unexpected extra argument"),
}


@pytest.mark.parametrize("name", list(USAGE_ERRORS))
def test_usage_errors_exit_2_with_a_usage_line(name: str, capsys):
    args, command, fragment = USAGE_ERRORS[name]
    code, _, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "internal error" not in err and "Traceback" not in err
    assert lines[-1].startswith("error: ") and fragment in lines[-1], err
    if command is not None:  # errors that know their command say how to use it, and where the help is
        assert lines == [lines[0], lines[-1]] and lines[0].startswith(f"Usage: rewardtune {command}".rstrip()), err
        assert lines[-1].endswith(f"(see `rewardtune {command} --help`)".replace("  ", " ")), err
    else:
        assert lines == [lines[-1]], err


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["--version"], ["--debug", "eval", "--help"]])
def test_help_and_version_exit_0(args: list[str], capsys):
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert err == ""
    if args == ["--version"]:
        from importlib.metadata import version

        assert out == f"rewardtune {version('rewardtune')}\n"
    else:
        assert out.startswith("Usage: rewardtune")


def commands() -> list[str]:
    from rewardtune.cli import app

    return [c.name or c.callback.__name__ for c in app.registered_commands]


def test_every_command_has_plain_help(capsys):
    """Each command's help: exit 0; the usage line names arguments by upper-case metavars (no `{recipe}`); flags
    show no type (no `<bool>`); recipe tables in the text stay visible (`[distill]`)."""
    metavars = {"run": "RECIPE", "distill": "RECIPE", "eval": "RUN_DIR", "sample": "RUN_DIR", "export": "RUN_DIR", "report": "FOLDER", "plugins": "", "score": "RUN_DIR INPUT_FOLDER",
                "bench": "RECIPE"}
    assert sorted(commands()) == sorted(metavars)
    for command, metavar in metavars.items():
        code, out, err = cli(capsys, command, "--help")
        assert code == 0, err
        usage = out.splitlines()[0]
        assert usage == f"Usage: rewardtune {command} [OPTIONS] {metavar}".rstrip(), usage
        assert "{" not in out and "<bool>" not in out, out
        options = re.findall(r"^\s+(?:-\w, )?(-[-\w]+)( [A-Z_.=]+)?\s{2,}", out.split("Options:")[1], flags=re.MULTILINE)
        assert options and ("--help", "") in options, out
        for option, metavar in options:  # a value is named by a metavar; a flag takes none
            assert metavar or option in {"--resume", "--force", "--best", "--raw", "--bptt", "--rss", "--trained-weights", "--help"}, (command, option)
    code, out, _ = cli(capsys, "distill", "--help")
    assert "[distill]" in out and "--teacher RUN_DIR" in out
    code, out, _ = cli(capsys, "run", "--help")
    assert "--set TABLE.KEY=VALUE" in out and "--out RUN_DIR" in out and "--steps N" in out


@pytest.mark.parametrize("command", [["eval", "RUN"], ["sample", "RUN"]])
def test_ctrl_c_outside_training_exits_130(command: list[str], capsys, monkeypatch):
    """A KeyboardInterrupt while a run is loaded (training handles SIGINT itself): "interrupted", exit 130."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("rewardtune.api.load_run", interrupted)
    monkeypatch.setattr("rewardtune.api.is_conditional_run", lambda run_dir: False)  # `sample` reads the recipe first
    code, _, err = cli(capsys, *command)
    assert (code, err.strip()) == (130, "interrupted")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 2-step tiny_8gaussians run without EMA."""
    import rewardtune as rt

    out = tmp_path_factory.mktemp("cli") / "run"
    rt.run_recipe(rt.load_recipe(TINY, [s for s in SETS if s != "--set"]), out)
    return out


def notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note: ")]


def test_resume_and_force_that_do_nothing_say_so(tmp_path: Path, tiny_run: Path, capsys):
    """--resume without a checkpoint starts fresh and --force with nothing to force: each says so in a note; a
    --resume or --force that acts says nothing."""
    out = tmp_path / "fresh"
    code, _, err = cli(capsys, "run", TINY, "--out", str(out), *SETS, "--resume", "--force")
    assert code == 0, err
    assert notes(err) == [
        f"note: --resume: {out} holds no checkpoint yet; starting fresh",
        f"note: --force: {out} holds no other run, so there is nothing to force",
    ]
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, _, err = cli(capsys, "run", TINY, "--out", str(run), *SETS, "--force")  # forced: reruns a finished run
    assert code == 0, err
    assert notes(err) == []
    code, _, err = cli(capsys, "run", TINY, "--out", str(run), *SETS, "--resume")  # resumes from step 2
    assert code == 0, err
    assert notes(err) == []


def test_eval_raw_without_ema_says_so(tiny_run: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, _, err = cli(capsys, "eval", str(run), "--raw")
    assert code == 0, err
    assert notes(err) == [
        f"note: --raw: {run} keeps no EMA (train.ema_decay = 0), so its trained weights are the ones evaluated either way"
    ]
    assert (run / "eval_raw.json").is_file()


def test_value_warmup_longer_than_the_run_is_warned_once(tmp_path: Path, capsys):
    code, _, err = cli(capsys, "run", TINY, "--out", str(tmp_path / "run"), *SETS, "--set", "algorithm.value_warmup=5")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        (
            "warning: algorithm.value_warmup = 5 >= train.steps = 2: the policy takes no improvement step in this run "
            "(only the value, and a learning reward, are trained)"
        )
    ]


def test_recipe_warnings_cover_distillation_phases():
    """distill's DxDP phase (and its warm-up) starts after the regression: both count; warm-up 0 warns of nothing."""
    from rewardtune.recipe import load_recipe, recipe_warnings

    distill = ROOT / "recipes" / "distill_8gaussians.toml"
    assert recipe_warnings(load_recipe(distill, ["train.steps=3000", "algorithm.value_warmup=0"])) == []
    (warning,) = recipe_warnings(load_recipe(distill, ["train.steps=3010", "algorithm.value_warmup=10"]))
    assert warning.startswith("algorithm.regression_steps + value_warmup = 3000 + 10 >= train.steps = 3010")
    assert recipe_warnings(load_recipe(distill, ["train.steps=3011", "algorithm.value_warmup=10"])) == []
    (warning,) = recipe_warnings(load_recipe(TINY, ["eval.keep_best=sliced_wasserstein", "train.eval_every=20"]))
    assert "no best checkpoint is kept" in warning


def test_report_curves_with_nothing_to_plot_is_an_error(tiny_run: Path, tmp_path: Path, capsys):
    runs = tmp_path / "runs"
    (runs / "a_s0").mkdir(parents=True)
    shutil.copy(tiny_run / "eval.json", runs / "a_s0" / "eval.json")  # no metrics.jsonl
    code, _, err = cli(capsys, "report", str(runs), "--curves", str(tmp_path / "c.png"))
    assert code == 2
    assert err.strip().splitlines() == [f"error: --curves: no run under {runs} has a metrics.jsonl with timed records to plot"]
    assert not (tmp_path / "c.png").exists()
