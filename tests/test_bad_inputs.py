"""Bad input never gives a traceback: one table of bad inputs through the CLI (in this process, for speed).

Every case must exit 2 with exactly one `error: ...` line on stderr, naming what is wrong. Progress lines (the
step-0 evaluation, the bar) may come before it for the failures that happen during training. No case may print a
traceback, and a run directory that existed before the command must hold the same files with the same bytes
afterwards.
"""

from __future__ import annotations

import pickle
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_8gaussians.toml"
# The finished run that the run-directory cases start from (and that they repeat, so the recipe matches).
RUN_SETS = ["train.steps=4", "train.checkpoint_every=2", "eval.num_samples=200", "eval.repeats=1", "eval.plot=false"]
SETS = [arg for s in RUN_SETS for arg in ("--set", s)]
FAULTY = 'kind = "faulty_rewards:build_faulty_reward"'
MARKER = Path("/tmp/rewardtune_bad_inputs_pickle_ran")
PROGRESS = ("initial:", "training", "resumed from")  # lines the CLI prints on stderr before a failure in training


class Payload:
    def __reduce__(self):  # a malicious pickle: runs code when loaded
        return (MARKER.write_text, ("pwned",))


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # CLI arguments; {recipe}, {run} and {tmp} are filled in
    expected: str  # a fragment of the one error line
    recipe: str | None = None  # TOML whose tables replace tiny_8gaussians.toml's; text that is not TOML is the file
    drop: tuple[str, ...] = ()  # tables removed from the recipe
    run: bool = False  # copy a finished run to {run} first (its files must be unchanged afterwards)
    setup: Callable[[Path], None] | None = None  # then prepare tmp_path (corrupt a checkpoint, write a module, ...)


def run_args(*extra: str) -> tuple[str, ...]:
    return ("run", "{recipe}", "--out", "{tmp}/out", *SETS, *extra)


def resume_args(*extra: str) -> tuple[str, ...]:
    return ("run", str(TINY), "--out", "{run}", *SETS, "--resume", *extra)


def checkpoint(tmp: Path, name: str = "") -> Path:
    root = tmp / "run" / "checkpoints"
    return root / (root / "latest").read_text().strip() / name


def truncate(tmp: Path) -> None:
    path = checkpoint(tmp, "model.safetensors")
    path.write_bytes(path.read_bytes()[:100])


def write(relative: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return setup


def garbage_state(tmp: Path) -> None:
    checkpoint(tmp, "state.pt").write_bytes(b"\x00not a torch file" * 10)


def malicious_state(tmp: Path) -> None:
    MARKER.unlink(missing_ok=True)
    with open(checkpoint(tmp, "state.pt"), "wb") as fh:
        pickle.dump({"step": Payload()}, fh)


def garbage_rng(tmp: Path) -> None:
    checkpoint(tmp, "rng_rank0.pt").write_bytes(b"PK\x03\x04 truncated zip")


def delete_checkpoint(name: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        target = checkpoint(tmp, name)
        target.unlink() if target.is_file() else shutil.rmtree(target)

    return setup


def no_checkpoints(tmp: Path) -> None:
    shutil.rmtree(tmp / "run" / "checkpoints")


def file_in_the_way(tmp: Path) -> None:
    (tmp / "file").write_text("a regular file, not a folder\n")


CASES: dict[str, Case] = {
    # ---- the recipe file ----------------------------------------------------------------------------------------
    "malformed TOML": Case(run_args(), "malformed TOML", recipe="[train\nsteps = 1"),
    "recipe not text": Case(run_args(), "not a text file", setup=write("bad.toml", b"\xff\xfe\x00binary")),
    "recipe missing": Case(("run", "{tmp}/nope.toml"), "recipe {tmp}/nope.toml does not exist"),
    "unknown table": Case(run_args(), "unknown table [trian] (did you mean 'train'?)", recipe="[trian]\nsteps = 1"),
    "unknown key": Case(run_args(), "[train] unknown key 'stesp' (did you mean 'steps'?)", recipe="[train]\nstesp = 1"),
    "unknown plugin option": Case(
        run_args(),
        "unknown key 'hiden' for kind 'mlp' (did you mean 'hidden'?)",
        recipe='[backbone]\nkind = "mlp"\nhiden = 8',
    ),
    "unknown config option": Case(
        run_args(), "did you mean 'tau_entropy'", recipe='[algorithm]\nkind = "dxdp"\ntau_entropyy = 1.0'
    ),
    "section not a table": Case(run_args(), "[run] must be a table, got int", recipe="run = 3"),
    "missing section": Case(run_args(), "missing table [algorithm]", drop=("algorithm",)),
    "missing kind": Case(run_args(), "[reward] needs a 'kind'", recipe="[reward]\nshare_with_value = true"),
    "kind not a string": Case(run_args(), "kind must be a string, got 3", recipe="[reward]\nkind = 3"),
    # ---- wrong types --------------------------------------------------------------------------------------------
    "string for int": Case(
        run_args(), "[train] log_every: expected an integer, got 'many'", recipe='[train]\nlog_every = "many"'
    ),
    "bool for int": Case(run_args(), "batch_size: expected an integer, got True", recipe="[train]\nbatch_size = true"),
    "float for int": Case(
        run_args(), "hidden: expected an integer, got 3.5", recipe='[backbone]\nkind = "mlp"\nhidden = 3.5'
    ),
    "string for float": Case(run_args(), "lr: expected a number", recipe='[value]\nkind = "time_mlp"\nlr = "fast"'),
    "bad choice": Case(run_args(), "'cubic' is not one of", recipe='[algorithm]\nkind = "dxdp"\ntime_cost = "cubic"'),
    "bad choice suggestion": Case(
        run_args(),
        "'cosin' is not one of 'constant', 'cosine' (did you mean 'cosine'?)",
        recipe='[train]\nlr_schedule = "cosin"',
    ),
    # ---- sizes and ranges ---------------------------------------------------------------------------------------
    "zero batch": Case(run_args(), "batch_size must be positive, got 0", recipe="[train]\nbatch_size = 0"),
    "negative batch": Case(run_args(), "batch_size must be positive, got -4", recipe="[train]\nbatch_size = -4"),
    "zero T": Case(run_args(), "num_steps must be positive, got 0", recipe='[backbone]\nkind = "mlp"\nnum_steps = 0'),
    "zero depth": Case(run_args(), "depth must be positive, got 0", recipe='[value]\nkind = "time_mlp"\ndepth = 0'),
    "negative lr": Case(run_args(), "lr must be >= 0, got -0.001", recipe='[value]\nkind = "time_mlp"\nlr = -1e-3'),
    "rate above 1": Case(run_args(), "ema_decay must be in [0, 1], got 1.5", recipe="[train]\nema_decay = 1.5"),
    "zero checkpoints kept": Case(
        run_args(), "keep_checkpoints must be positive, got 0", recipe="[train]\nkeep_checkpoints = 0"
    ),
    "zero eval samples": Case(run_args("--set", "eval.num_samples=0"), "num_samples must be positive, got 0"),
    "negative steps flag": Case(run_args("--steps", "-1"), "steps must be >= 0, got -1"),
    "keep_best not a metric": Case(
        run_args("--set", "eval.keep_best=fid"), "eval.keep_best = 'fid' is not a metric of this run"
    ),
    # ---- --set ------------------------------------------------------------------------------------------------------
    "--set unknown key": Case(run_args("--set", "train.nope=1"), "[train] unknown key 'nope'"),
    "--set unknown table": Case(run_args("--set", "trian.steps=1"), "unknown table [trian] (did you mean 'train'?)"),
    "--set unknown plugin key": Case(run_args("--set", "backbone.hiden=8"), "did you mean 'hidden'"),
    "--set no value": Case(run_args("--set", "steps"), "expected table.key=value"),
    "--set wrong type": Case(run_args("--set", "train.steps=abc"), "expected an integer, got 'abc'"),
    # ---- plugins ------------------------------------------------------------------------------------------------
    "unknown plugin": Case(
        run_args(), "unknown reward 'enrgy'; did you mean 'energy'?", recipe='[reward]\nkind = "enrgy"'
    ),
    "unknown data": Case(run_args(), "did you mean '8gaussians'", recipe='[data]\nkind = "8gausians"'),
    "plugin module missing": Case(
        run_args(), "cannot import module 'no_such_pkg", recipe='[reward]\nkind = "no_such_pkg.mod:factory"'
    ),
    "plugin attribute missing": Case(
        run_args(), "has no attribute 'build_nothing'", recipe='[reward]\nkind = "faulty_rewards:build_nothing"'
    ),
    "plugin import error": Case(
        run_args(),
        "importing 'rt_explodes' failed: RuntimeError: exploded at import",
        recipe='[reward]\nkind = "rt_explodes:build"',
        setup=write("plugins/rt_explodes.py", 'raise RuntimeError("exploded at import")\n'),
    ),
    "plugin dependency missing": Case(
        run_args(),
        "No module named 'rt_no_such_dependency'",
        recipe='[reward]\nkind = "rt_needs_dep:build"',
        setup=write("plugins/rt_needs_dep.py", "import rt_no_such_dependency\n"),
    ),
    "plugin rejects option": Case(
        run_args(),
        "[reward] kind 'faulty_rewards:build_faulty_reward': mode must be one of",
        recipe=f'[reward]\n{FAULTY}\nmode = "odd"',
    ),
    "plugin wrong shape": Case(
        run_args(),
        "reward 'faulty' returned shape (32, 1) for a batch of 32; expected (32,) at step 1",
        recipe=f'[reward]\n{FAULTY}\nmode = "shape"',
    ),
    "plugin NaN": Case(
        run_args(),
        "reward 'faulty' returned NaN/inf for 32 of 32 samples at step 3; the last checkpoint is kept",
        recipe=f'[reward]\n{FAULTY}\nmode = "nan"\nafter = 2',
    ),
    "plugin inf": Case(
        run_args(),
        "reward 'faulty' returned NaN/inf for 32 of 32 samples at step 1",
        recipe=f'[reward]\n{FAULTY}\nmode = "inf"',
    ),
    "plugin not a tensor": Case(
        run_args(), "reward 'faulty' returned a list for a batch of 32", recipe=f'[reward]\n{FAULTY}\nmode = "list"'
    ),
    "dxdp without value": Case(
        run_args(), "algorithm 'dxdp' needs a [value] section", recipe=f"[reward]\n{FAULTY}", drop=("value",)
    ),
    "NaN loss": Case(
        run_args("--set", "value.lr=1e30"), "value/td_loss became nan at step 1; the last checkpoint is kept"
    ),
    # ---- data and starting weights --------------------------------------------------------------------------------
    "dataset missing offline": Case(
        run_args("--set", "data.root={tmp}/no_cifar"),
        "CIFAR-10 is not in {tmp}/no_cifar",
        recipe='[data]\nkind = "cifar10"\ndownload = false',
    ),
    "image folder empty": Case(
        run_args(),
        "no images",
        recipe='[data]\nkind = "image_folder"\npath = "{tmp}/empty"',
        setup=write("empty/notes.txt", ""),
    ),
    "image folder corrupt image": Case(
        run_args(),
        "cannot read image {tmp}/imgs/bad.png",
        recipe='[data]\nkind = "image_folder"\npath = "{tmp}/imgs"',
        setup=write("imgs/bad.png", b"not a png at all"),
    ),
    "image folder channels": Case(
        run_args(),
        "channels must be 1 (grey) or 3 (RGB), got 2",
        recipe='[data]\nkind = "image_folder"\npath = "{tmp}/imgs"\nchannels = 2',
        setup=write("imgs/bad.png", b"never read"),
    ),
    "fastdpm with one step": Case(
        run_args("--set", "backbone.num_steps=1", "--set", "backbone.schedule=fastdpm"),
        "the fastdpm schedule needs num_steps >= 2, got 1",
    ),
    "negative knn_entropy": Case(
        run_args(), "knn_entropy must be >= 0, got -1.0", recipe='[algorithm]\nkind = "policy_gradient"\nknn_entropy = -1.0'
    ),
    "init_from missing": Case(
        run_args("--set", "backbone.init_from={tmp}/nowhere"), "backbone.init_from: {tmp}/nowhere does not exist"
    ),
    "init_from without checkpoint": Case(
        run_args("--set", "backbone.init_from={tmp}/empty"),
        "backbone.init_from: no checkpoint in",
        setup=write("empty/x.txt", ""),
    ),
    # ---- the output directory -----------------------------------------------------------------------------------
    "unwritable output": Case(
        ("run", str(TINY), "--out", "{tmp}/file/out", *SETS), "cannot write to {tmp}/file/out", setup=file_in_the_way
    ),
    "run exists, no --resume": Case(
        ("run", str(TINY), "--out", "{run}", *SETS), "already holds this run; pass --resume", run=True
    ),
    "resume changed recipe": Case(
        resume_args("--set", "backbone.num_steps=4"),
        "holds a run of a different recipe; use another --out, or --force",
        run=True,
    ),
    "resume T mismatch, forced": Case(
        resume_args("--set", "backbone.num_steps=4", "--force"),
        "checkpoint does not fit module 'backbone': size mismatch",
        run=True,
    ),
    # ---- checkpoints --------------------------------------------------------------------------------------------
    "truncated weights": Case(resume_args(), "cannot read", run=True, setup=truncate),
    "corrupt state": Case(resume_args(), "refusing to load", run=True, setup=garbage_state),
    "missing state": Case(resume_args(), "missing checkpoint file", run=True, setup=delete_checkpoint("state.pt")),
    "malicious pickle": Case(resume_args(), "refusing to load", run=True, setup=malicious_state),
    "corrupt rng": Case(resume_args(), "refusing to load", run=True, setup=garbage_rng),
    "latest names a deleted checkpoint": Case(
        resume_args(), "which does not exist", run=True, setup=delete_checkpoint("")
    ),
    "eval truncated checkpoint": Case(("eval", "{run}"), "cannot read", run=True, setup=truncate),
    "eval no checkpoint": Case(("eval", "{run}"), "has no checkpoint yet", run=True, setup=no_checkpoints),
    "eval no best": Case(("eval", "{run}", "--best"), "has no best checkpoint", run=True),
    "eval corrupt recipe.toml": Case(
        ("eval", "{run}"), "malformed TOML", run=True, setup=write("run/recipe.toml", "[train\n")
    ),
    "eval not a run": Case(("eval", "{tmp}"), "is not a run directory (no recipe.toml)"),
    "sample not a run": Case(("sample", "{tmp}/nothing"), "is not a run directory"),
    "sample unwritable output": Case(
        ("sample", "{run}", "-n", "8", "-o", "{tmp}/file/s.npz"),
        "cannot write {tmp}/file/s.npz",
        run=True,
        setup=file_in_the_way,
    ),
    "report not a folder": Case(("report", "{tmp}/nothing"), "is not a folder"),
    "report malformed eval.json": Case(
        ("report", "{tmp}/runs"), "eval.json: not valid JSON", setup=write("runs/a_s0/eval.json", '{"step": 3, "metr')
    ),
    "report bad wall time": Case(
        ("report", "{tmp}/runs"),
        "wall_times.txt:1: 'fast' is not a number of seconds",
        setup=lambda tmp: (
            write("runs/a_s0/eval.json", '{"step": 3, "metrics": {"m": 1.0}}')(tmp),
            write("runs/wall_times.txt", "a_s0 fast\n")(tmp),
        ),
    ),
    "resume other optimisers, forced": Case(
        resume_args("--set", "backbone.learn_sigma=false", "--force"),
        "does not fit this recipe's optimisers or algorithm",
        run=True,
    ),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 4-step run of tiny_8gaussians (checkpoints at steps 2 and 4)."""
    import rewardtune as rt

    out = tmp_path_factory.mktemp("base") / "run"
    rt.run_recipe(rt.load_recipe(TINY, RUN_SETS), out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_recipe(case: Case, tmp: Path) -> Path:
    import tomllib

    import tomli_w

    path = tmp / "bad.toml"
    if path.exists():  # written by the case's setup
        return path
    patch = (case.recipe or "").replace("{tmp}", str(tmp))
    try:
        raw = {**tomllib.loads(TINY.read_text()), **tomllib.loads(patch)}
        for table in case.drop:
            raw.pop(table)
        path.write_text(tomli_w.dumps(raw))
    except tomllib.TOMLDecodeError:
        path.write_text(patch)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line(name: str, tmp_path: Path, capsys, monkeypatch, request):
    case = CASES[name]
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    for module in ("rt_explodes", "rt_needs_dep"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    if case.run:
        shutil.copytree(request.getfixturevalue("finished_run"), tmp_path / "run")
    if case.setup is not None:
        case.setup(tmp_path)
    before = snapshot(tmp_path / "run") if case.run else None
    recipe = make_recipe(case, tmp_path)
    args = [
        a.replace("{recipe}", str(recipe)).replace("{run}", str(tmp_path / "run")).replace("{tmp}", str(tmp_path))
        for a in case.args
    ]

    code, out, err = cli(capsys, *args)

    assert code == 2, err
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # one error line, and it is the last
    assert all(line.startswith(PROGRESS) for line in lines[:-1]), err  # anything before it is progress
    assert case.expected.replace("{tmp}", str(tmp_path)) in errors[0], errors[0]
    if before is not None:
        assert snapshot(tmp_path / "run") == before  # the run directory is as it was
    assert not MARKER.exists()  # no pickled code ran


def test_a_failing_user_factory_is_a_one_line_plugin_error(tmp_path: Path, monkeypatch):
    """A "package.module:factory" named for an EDM network or a feature extractor is called by rewardtune; whatever
    it raises becomes a PluginError naming it (exit 2 from the CLI), not an internal error."""
    from rewardtune.errors import PluginError
    from rewardtune.metrics.fid import build_feature_extractor

    (tmp_path / "rt_bad_factory.py").write_text("def build():\n    raise OSError('weights.pt: no such file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="calling 'rt_bad_factory:build' failed: OSError: weights.pt: no such file"):
        build_feature_extractor("rt_bad_factory:build")
