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
    at_build: bool = False  # the error must come before training starts: no progress line before it


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
        run_args("--set", "eval.keep_best=fid", "--set", "train.eval_every=2"),
        "eval.keep_best = 'fid' is not a metric of this run (energy_auc, min_mode_mass, mode_coverage, sliced_wasserstein, sliced_wasserstein_std)",
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
        recipe=f'[reward]\n{FAULTY}\nmode = "shape"\nafter = 1',  # call 1: the step-0 evaluation
    ),
    "plugin NaN": Case(
        run_args(),
        "reward 'faulty' returned NaN/inf for 32 of 32 samples at step 3; the last checkpoint is kept",
        recipe=f'[reward]\n{FAULTY}\nmode = "nan"\nafter = 3',
    ),
    "plugin inf": Case(
        run_args(),
        "reward 'faulty' returned NaN/inf for 32 of 32 samples at step 1",
        recipe=f'[reward]\n{FAULTY}\nmode = "inf"\nafter = 1',
    ),
    "plugin not a tensor": Case(
        run_args(), "reward 'faulty' returned a list for a batch of 32", recipe=f'[reward]\n{FAULTY}\nmode = "list"\nafter = 1'
    ),
    "plugin not a tensor in evaluation": Case(
        run_args(), "reward 'faulty' returned a list for a batch of 200; expected a Tensor of shape (200,) in the "
        "evaluation at step 0", recipe=f'[reward]\n{FAULTY}\nmode = "list"'
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
        resume_args("--set", "train.steps=8"),
        "holds a run of a different recipe (train.steps changed); use another --out, or --force",
        run=True,
    ),
    "resume changes T": Case(
        resume_args("--set", "backbone.num_steps=4"), "--resume cannot change backbone.num_steps (3 -> 4)", run=True
    ),
    "resume changes T, forced": Case(
        resume_args("--set", "backbone.num_steps=4", "--force"),
        "--resume cannot change backbone.num_steps (3 -> 4): the checkpoint holds the sampler of the old architecture",
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
        "--resume cannot change backbone.learn_sigma (True -> False)",
        run=True,
    ),
    "resume other seed, forced": Case(
        resume_args("--set", "train.seed=1", "--force"), "--resume cannot change train.seed (0 -> 1)", run=True
    ),
}


# ---- plugins failing in their own code, or returning the wrong thing (tests/faulty_plugins.py) -------------------------
PLUGINS = "faulty_plugins:"
KEPT = "; the last checkpoint is kept"
IMAGES = '[data]\nkind = "digits"\n[eval]\nnum_samples = 20\nfeature_extractor = "digits"\nplot = false\n'
TERMS = '[reward]\nkind = "composite"\n[[reward.terms]]\nkind = "energy"\nshare_with_value = false\n[[reward.terms]]\n'


def image_args(*extra: str) -> tuple[str, ...]:
    """A 2-step run on 8x8 digits (IMAGES), checkpoint at every step."""
    return ("run", "{recipe}", "--out", "{tmp}/out", "--set", "train.steps=2", "--set", "train.checkpoint_every=1", *extra)


def plugin(table: str, factory: str, **options) -> str:
    """A recipe patch: `[table]` made by faulty_plugins.<factory> with `options`."""
    lines = [f"[{table}]", f'kind = "{PLUGINS}{factory}"', *(f"{k} = {v!r}".replace("'", '"') for k, v in options.items())]
    return "\n".join(lines) + "\n"


def png(path: str, mode: str, size: int = 8) -> Callable[[Path], None]:
    """Write a `size` x `size` PNG (mode "L" grey, "RGB") to tmp/`path`."""

    def setup(tmp: Path) -> None:
        from PIL import Image

        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, (size, size), color=128 if mode == "L" else (10, 120, 240)).save(tmp / path)

    return setup


def folder_of_pngs(count: int, mode: str, size: int = 8) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for i in range(count):
            png(f"imgs/{i}.png", mode, size)(tmp)

    return setup


PLUGIN_FAILURE_CASES: dict[str, Case] = {
    # a factory failing in its own code, for each kind of plugin table (and a composite's term)
    "reward factory raises": Case(
        run_args(), f"[reward] kind '{PLUGINS}build_reward_missing_weights' failed while the recipe was built "
        "(FileNotFoundError: [Errno 2] No such file or directory: 'no/such/dir/weights.pt')",
        recipe=plugin("reward", "build_reward_missing_weights"), at_build=True,
    ),
    "data factory raises": Case(
        run_args(), f"[data] kind '{PLUGINS}build_data_missing_files' failed while the recipe was built (FileNotFoundError",
        recipe=plugin("data", "build_data_missing_files"), at_build=True,
    ),
    "composite term factory raises": Case(
        run_args(), f"[[reward.terms]] #2 kind '{PLUGINS}build_reward_missing_weights' failed while the recipe was built",
        recipe=TERMS + f'kind = "{PLUGINS}build_reward_missing_weights"\n', at_build=True,
    ),
    "feature extractor factory raises": Case(
        image_args("--set", "eval.feature_extractor=rt_bad_features:build"),
        "feature extractor 'rt_bad_features:build': calling 'rt_bad_features:build' failed: OSError: features.pt: gone",
        recipe=IMAGES, setup=write("plugins/rt_bad_features.py", "def build():\n    raise OSError('features.pt: gone')\n"),
        at_build=True,
    ),
    # a factory returning something that is not a plugin of its kind
    "reward factory returns None": Case(
        run_args(), f"[reward] kind '{PLUGINS}build_reward_none' returned None, not a Reward",
        recipe=plugin("reward", "build_reward_none"), at_build=True,
    ),
    "reward factory returns a function": Case(
        run_args(), "returned the function faulty_plugins.build_reward_function.<locals>.ring, not a Reward",
        recipe=plugin("reward", "build_reward_function"), at_build=True,
    ),
    "composite term returns None": Case(
        run_args(), f"term 'build_reward_none' (kind '{PLUGINS}build_reward_none'): returned NoneType, not a Reward",
        recipe=TERMS + f'kind = "{PLUGINS}build_reward_none"\n', at_build=True,
    ),
    "backbone factory returns None": Case(
        run_args(), f"[backbone] kind '{PLUGINS}build_backbone_none' returned None, not a GaussianChainPolicy",
        recipe=plugin("backbone", "build_backbone_none"), at_build=True,
    ),
    "value factory returns a function": Case(
        run_args(), f"[value] kind '{PLUGINS}build_value_function' returned the function", recipe=plugin("value", "build_value_function"),
        at_build=True,
    ),
    "data without sample_shape": Case(
        run_args(), "returned a build_data_without_shape.<locals>.NoShape, not a data source",
        recipe=plugin("data", "build_data_without_shape"), at_build=True,
    ),
    "algorithm without update": Case(
        run_args(), "not an algorithm (needs_rollout, update, modules, optimizers, state_dict, load_state_dict; "
        "docs/architecture.md); it lacks update, optimizers, state_dict, load_state_dict",
        recipe=plugin("algorithm", "build_algorithm_without_update"), at_build=True,
    ),
    # plugin code failing while training (the step) and while evaluating
    "reward forward raises in training": Case(
        run_args(), f"[reward] kind '{PLUGINS}build_failing_reward' failed at step 2 (RuntimeError: forward exploded){KEPT}",
        recipe=plugin("reward", "build_failing_reward", fail_at=3),  # call 1: the step-0 evaluation's reward_mean
    ),
    "learning reward update raises": Case(
        run_args(), f"[reward] kind '{PLUGINS}build_failing_energy' failed at step 2 (KeyError: 'energy/missing'){KEPT}",
        recipe=plugin("reward", "build_failing_energy", fail_at=2),
    ),
    "composite term raises in training": Case(  # calls 1, 2: the energy AUC of the step-0 evaluation
        run_args(), f"[[reward.terms]] #2 kind '{PLUGINS}build_failing_reward' failed at step 1 (RuntimeError",
        recipe=TERMS + f'kind = "{PLUGINS}build_failing_reward"\nfail_at = 3\n' + "[eval]\nnum_samples = 20\nrepeats = 1\nplot = false\n",
    ),
    "data sample raises in training": Case(
        run_args(), f"[data] kind '{PLUGINS}build_failing_data' failed at step 2 (RuntimeError: data shard unreadable){KEPT}",
        recipe=plugin("data", "build_failing_data", fail_at=4),
    ),
    "data sample raises in evaluation": Case(
        run_args(), f"[data] kind '{PLUGINS}build_failing_data' failed in the evaluation at step 0 (RuntimeError",
        recipe=plugin("data", "build_failing_data", fail_at=1),
    ),
    "backbone network raises": Case(
        run_args(), f"[backbone] kind '{PLUGINS}build_failing_backbone' failed at step 2 (RuntimeError: backbone network exploded)",
        recipe=plugin("backbone", "build_failing_backbone", fail_at=8),
    ),
    "value network raises": Case(
        run_args(), f"[value] kind '{PLUGINS}build_failing_value' failed at step 1 (RuntimeError: backbone network exploded)",
        recipe=plugin("value", "build_failing_value", fail_at=3),
    ),
    "algorithm update raises": Case(
        run_args(), f"[algorithm] kind '{PLUGINS}build_failing_algorithm' failed at step 2 (ZeroDivisionError: division by zero){KEPT}",
        recipe=plugin("algorithm", "build_failing_algorithm", fail_at=2),
    ),
    "reward evaluation_metrics raises": Case(
        image_args(), f"[reward] kind '{PLUGINS}build_failing_reward' failed in the evaluation at step 0 (RuntimeError: "
        "evaluation_metrics exploded)",
        recipe=IMAGES + plugin("reward", "build_failing_reward", fail_in="evaluation_metrics", fail_at=1),
    ),
    "reward forward raises in evaluation": Case(
        image_args(), f"[reward] kind '{PLUGINS}build_failing_reward' failed in the evaluation at step 0 (RuntimeError",
        recipe=IMAGES + plugin("reward", "build_failing_reward", fail_at=1),
    ),
}

EVALUATION_CASES: dict[str, Case] = {  # settings the evaluator cannot honour for this data: refused before training
    "digits features on RGB images": Case(
        image_args("--set", "data.path={tmp}/imgs"),
        "eval.feature_extractor = 'digits' takes 1x8x8 grey digits, but this data's images are 3x8x8",
        recipe=IMAGES.replace('kind = "digits"', 'kind = "image_folder"\nsize = 8\nchannels = 3'),
        setup=folder_of_pngs(4, "RGB"), at_build=True,
    ),
    "digits features on 16x16 grey images": Case(
        image_args("--set", "data.path={tmp}/imgs"),
        "takes 1x8x8 grey digits, but this data's images are 1x16x16",
        recipe=IMAGES.replace('kind = "digits"', 'kind = "image_folder"\nsize = 16\nchannels = 1'),
        setup=folder_of_pngs(4, "L", 16), at_build=True,
    ),
    "too few samples for precision/recall": Case(
        image_args("--set", "eval.num_samples=3"), "precision/recall needs at least 4 samples (eval.num_samples), got 3",
        recipe=IMAGES, at_build=True,
    ),
    "too few reference images": Case(
        image_args("--set", "data.path={tmp}/imgs"), "precision/recall needs at least 4 reference images (the data's), got 2",
        recipe=IMAGES.replace('kind = "digits"', 'kind = "image_folder"\nsize = 8\nchannels = 1'),
        setup=folder_of_pngs(2, "L"), at_build=True,
    ),
    "feature extractor returns the wrong shape": Case(
        image_args("--set", f"eval.feature_extractor={PLUGINS}build_wrong_shape_features"),
        f"feature extractor '{PLUGINS}build_wrong_shape_features' returned (2, 1, 8, 8) for 2 images of shape (1, 8, 8); "
        "expected features [2, F]", recipe=IMAGES, at_build=True,
    ),
    "feature extractor raises": Case(
        image_args("--set", f"eval.feature_extractor={PLUGINS}build_failing_features"),
        "failed on images of shape (1, 8, 8) (RuntimeError: feature network exploded)", recipe=IMAGES, at_build=True,
    ),
    "guidance without a value function": Case(
        run_args("--set", "eval.guidance_scale=0.5"),
        "eval.guidance_scale = 0.5: value guidance needs a cost-to-go value function (dxdp); policy_gradient's is a baseline",
        recipe='[algorithm]\nkind = "policy_gradient"', at_build=True,
    ),
    "guidance with ddpm": Case(
        run_args("--set", "eval.guidance_scale=1"), "eval.guidance_scale = 1.0: value guidance needs an algorithm with a value",
        recipe='[algorithm]\nkind = "ddpm"', drop=("reward", "value"), at_build=True,
    ),
    "keep_best names no metric of images": Case(
        image_args("--set", "eval.keep_best=sliced_wasserstein", "--set", "train.eval_every=1"),
        "eval.keep_best = 'sliced_wasserstein' is not a metric of this run (frechet_distance, precision, recall)",
        recipe=IMAGES, at_build=True,
    ),
    "repeats on images": Case(image_args("--set", "eval.repeats=3"), "eval.repeats = 3 applies to vector data", recipe=IMAGES, at_build=True),
    "image features on vectors": Case(
        run_args("--set", "eval.feature_extractor=digits"), "eval.feature_extractor applies to images (C, H, W); this data "
        "gives samples of shape (2,)", at_build=True,
    ),
    "reference samples on vectors": Case(run_args("--set", "eval.reference_samples=10"), "eval.reference_samples applies to images", at_build=True),
    "plot of one coordinate": Case(
        run_args("--set", "eval.plot=true"), "eval.plot draws the first two coordinates, but samples have shape (1,)",
        recipe=plugin("data", "build_scalar_data"), at_build=True,
    ),
    "matrix samples": Case(
        run_args(), "evaluation takes vectors (D,) or images (C, H, W); this data gives samples of shape (2, 2)",
        recipe=plugin("data", "build_matrix_data"), at_build=True,
    ),
}

IGNORED_SETTING_CASES: dict[str, Case] = {  # a setting the rest of the recipe would silently ignore
    "best_mode without keep_best": Case(run_args("--set", "eval.best_mode=max"), "[eval] best_mode applies to keep_best", at_build=True),
    "keep_best without periodic evaluations": Case(
        run_args("--set", "eval.keep_best=sliced_wasserstein"), "train.eval_every = 0 makes none: set train.eval_every",
        at_build=True,
    ),
    "lr_final_fraction without cosine": Case(
        run_args("--set", "train.lr_final_fraction=0.1"), "[train] lr_final_fraction applies to lr_schedule = 'cosine'",
        at_build=True,
    ),
    "teacher that no plugin uses": Case(
        run_args("--set", "distill.teacher={tmp}"), "[distill] names a teacher (or --teacher was given), but no plugin of "
        "this recipe uses one (algorithm 'dxdp')", at_build=True,
    ),
    "distill --teacher on an ordinary recipe": Case(
        ("distill", "{recipe}", "--teacher", "{tmp}", "--out", "{tmp}/out"), "but no plugin of this recipe uses one",
        at_build=True,
    ),
    "distill without a teacher": Case(
        ("distill", "{recipe}", "--out", "{tmp}/out"), "has no [distill] table naming the teacher, and no --teacher",
        at_build=True,
    ),
    "sample --guidance with ddpm": Case(
        ("sample", "{run}", "--guidance", "1", "-o", "{tmp}/s.npz"), "--guidance = 1.0: value guidance needs", run=True,
        setup=lambda tmp: ddpm_run(tmp / "run"), at_build=True,
    ),
}

ALL_CASES = {**CASES, **PLUGIN_FAILURE_CASES, **EVALUATION_CASES, **IGNORED_SETTING_CASES}


def ddpm_run(run: Path) -> None:
    """Replace tmp/run by a finished 1-step `ddpm` pretraining run (no value function)."""
    import tomllib

    import rewardtune as rt
    from rewardtune.recipe import parse_recipe

    shutil.rmtree(run)
    raw = {**tomllib.loads(TINY.read_text()), "algorithm": {"kind": "ddpm"}}
    for table in ("value", "reward"):
        raw.pop(table)
    raw["train"].update(steps=1, checkpoint_every=1)
    raw["eval"].update(num_samples=50, repeats=1, plot=False)
    rt.run_recipe(parse_recipe(raw), run)


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


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_bad_input_exits_2_with_one_line(name: str, tmp_path: Path, capsys, monkeypatch, request):
    case = ALL_CASES[name]
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    for module in ("rt_explodes", "rt_needs_dep", "rt_bad_features"):
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
    assert not (case.at_build and lines[:-1]), err  # checked before training: nothing ran before the error
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
