"""Settings changed on --resume: each is applied (the resumed run uses the value recipe.toml records) or refused with
one line naming it, leaving the run directory as it was (rewardtune/resume.py: RESUME_POLICY)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_bad_inputs import snapshot
from test_cli import cli

import rewardtune as rt
from rewardtune import checkpoint as ckpt
from rewardtune.optim import GradStep
from rewardtune.recipe import read_toml
from rewardtune.resume import RESUME_POLICY
from rewardtune.trainer import Trainer, lr_multiplier

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_8gaussians.toml"
BASE = [
    "train.steps=4", "train.checkpoint_every=2", "train.eval_every=2", "train.ema_decay=0.9", "eval.num_samples=200",
    "eval.repeats=1", "eval.plot=false", "eval.keep_best=sliced_wasserstein",
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished 4-step tiny DxMI run (EMA, keep-best; checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("base") / "run"
    rt.run_recipe(rt.load_recipe(TINY, BASE), out)
    return out


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def resume(capsys, run: Path, *sets: str, force: bool = True, steps: int = 6) -> tuple[int, str]:
    args = ["run", str(TINY), "--out", str(run), "--resume", *(["--force"] if force else [])]
    for item in [*BASE, f"train.steps={steps}", *sets]:
        args += ["--set", item]
    code, _, err = cli(capsys, *args)
    return code, err


@pytest.fixture
def resumed(monkeypatch) -> list[Trainer]:
    """Collects the trainer of each resumed run as `fit` starts (after the checkpoint loaded), and records the batch
    size of every training rollout on it (`rollouts`)."""
    trainers = []
    fit = Trainer.fit

    def spy(self, *args, **kwargs):
        trainers.append(self)
        self.rollouts = []
        sample = self.backbone.sample
        self.backbone.sample = lambda n, *a, **k: self.rollouts.append(n) or sample(n, *a, **k)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", spy)
    return trainers


def weights(run: Path, step: int, prefix: str) -> dict[str, torch.Tensor]:
    flat, _, _ = ckpt.read_checkpoint(run / "checkpoints" / ckpt.checkpoint_name(step))
    return {k: v for k, v in flat.items() if k.startswith(prefix)}


# ---- applied ---------------------------------------------------------------------------------------------------------
def test_zero_learning_rates_on_resume_freeze_the_weights(base_run: Path, run: Path, resumed, capsys):
    """The issue's case: `--resume --set algorithm.sampler_lr=0.0 --set value.lr=0.0` (the energy shares the value's
    optimiser). Adam with lr 0 moves nothing: the weights after 4 more steps equal the checkpoint's, bit for bit.
    Before the fix the optimisers kept the checkpoint's lr 0.001 and the weights moved."""
    code, err = resume(capsys, run, "algorithm.sampler_lr=0.0", "algorithm.sigma_lr=0.0", "value.lr=0.0", steps=8)
    assert code == 0, err
    for prefix in ("backbone.", "value.", "reward."):
        before, after = weights(base_run, 4, prefix), weights(run, 8, prefix)
        assert before and all(torch.equal(before[k], after[k]) for k in before), prefix
    trainer = resumed[0]
    for opt in trainer.optimizers().values():
        assert all(group["base_lr"] == 0.0 for group in opt.optimizer.param_groups)
    assert "resuming with changed settings: algorithm.sampler_lr 0.001 -> 0.0" in err


@pytest.mark.parametrize(
    "setting, probe, expected",
    [
        ("algorithm.sampler_lr=0.0005", lambda tr: tr.algorithm.sampler_optimizer.optimizer.param_groups[0]["lr"], 0.0005),
        ("value.lr=0.002", lambda tr: tr.algorithm.value.optimizer.optimizer.param_groups[0]["base_lr"], 0.002),
        ("algorithm.tau_entropy=0.5", lambda tr: tr.algorithm.tau1, 0.5),
        ("algorithm.avr_alpha=0.5", lambda tr: tr.algorithm.config.avr_alpha, 0.5),
        ("train.ema_decay=0.5", lambda tr: tr.ema.decay, 0.5),
        ("eval.num_samples=100", lambda tr: tr.evaluator.num_samples, 100),
        ("train.batch_size=8", lambda tr: set(tr.rollouts), {8}),
        ("train.lr_schedule=\"cosine\"", lambda tr: tr.config.lr_schedule, "cosine"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_an_applied_setting_is_in_force_after_the_checkpoint_loads(run: Path, resumed, capsys, setting, probe, expected):
    code, err = resume(capsys, run, setting)
    assert code == 0, err
    assert probe(resumed[0]) == expected
    key, value = setting.split("=")
    table, name = key.split(".")
    assert read_toml(run / "recipe.toml")[table][name] == read_toml_value(value)  # recorded = used


def read_toml_value(text: str):
    import tomllib

    return tomllib.loads(f"v = {text}")["v"]


def test_the_lr_schedule_scales_the_new_base_rate(run: Path, resumed, capsys):
    """After a resume with a new rate and a cosine schedule, every optimiser's lr at each step is new base x
    multiplier(step), not the checkpoint's rate."""
    code, err = resume(capsys, run, "algorithm.sampler_lr=0.0004", "train.lr_schedule=\"cosine\"", steps=6)
    assert code == 0, err
    group = resumed[0].algorithm.sampler_optimizer.optimizer.param_groups[0]
    multiplier = lr_multiplier("cosine", 5, 6, 0.0)  # set before the last step, step index 5
    assert group["lr"] == pytest.approx(0.0004 * multiplier)


def test_a_changed_eval_setting_restarts_the_keep_best_record(run: Path, resumed, capsys):
    code, err = resume(capsys, run, "eval.num_samples=100", steps=4)  # nothing to train: no new evaluation
    assert code == 0, err
    assert resumed[0].best is None  # the old best was measured on 200 samples


def test_an_option_added_since_the_run_is_no_change(run: Path, resumed, capsys):
    """A recipe.toml written before an option existed lacks it; resolved again it has the default, so the same
    command resumes without --force."""
    text = (run / "recipe.toml").read_text()
    older = "\n".join(line for line in text.splitlines() if not line.startswith("cpu_threads = ")) + "\n"
    assert older != text  # the option is gone, whatever its default
    (run / "recipe.toml").write_text(older)
    code, err = resume(capsys, run, force=False, steps=4)
    assert code == 0, err


# ---- refused ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting, reason",
    [
        ("train.seed=1", "random streams continue from the checkpoint"),
        ("backbone.num_steps=4", "the sampler of the old architecture"),
        ("backbone.hidden=16", "the sampler of the old architecture"),
        ("value.hidden=16", "the value network of the old architecture"),
        ("reward.share_with_value=false", "the energy network of the old architecture"),
        ("algorithm.kind=\"policy_gradient\"", "another algorithm's optimisers"),
        ("train.ema_decay=0.0", "switching the EMA on or off"),
    ],
)
@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
def test_a_refused_setting_is_one_line_naming_it(run: Path, capsys, setting, reason, force):
    before = snapshot(run)
    code, err = resume(capsys, run, setting, force=force)
    key = setting.split("=")[0]
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and len([x for x in lines if "error" in x]) == 1, err
    assert f"--resume cannot change {key} (" in lines[-1] and reason in lines[-1], lines[-1]
    assert snapshot(run) == before


def test_a_setting_missing_from_the_table_is_refused_and_says_so(run: Path, capsys, monkeypatch):
    monkeypatch.delitem(RESUME_POLICY, "train.log_every")
    before = snapshot(run)
    code, err = resume(capsys, run, "train.log_every=1")
    assert code == 2
    assert "--resume cannot change train.log_every (5 -> 1): it is not in the resume table" in err
    assert snapshot(run) == before


def test_every_refusal_is_counted_in_the_one_line(run: Path, capsys):
    code, err = resume(capsys, run, "train.seed=1", "backbone.hidden=16", "train.steps=9")
    assert code == 2
    assert "cannot change backbone.hidden (32 -> 16)" in err and "(also refused: train.seed)" in err


def test_keep_best_must_name_a_metric_of_the_resumed_run(run: Path, capsys):
    before = snapshot(run)
    code, err = resume(capsys, run, "eval.keep_best=\"fid\"")
    assert code == 2 and "eval.keep_best = 'fid' is not a metric of this run" in err
    assert snapshot(run) == before


def test_applied_changes_without_force_name_the_changes(run: Path, capsys):
    before = snapshot(run)
    code, err = resume(capsys, run, "algorithm.sampler_lr=0.0", force=False)
    assert code == 2
    assert "holds a run of a different recipe (algorithm.sampler_lr, train.steps changed); use another --out, or --force" in err
    assert snapshot(run) == before


# ---- the optimiser keeps the recipe's hyperparameters --------------------------------------------------------------
def test_gradstep_load_keeps_its_own_hyperparameters_and_the_saved_moments():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    old = GradStep([([w], 1e-3)], betas=(0.9, 0.999))
    old.step((w**2).sum())
    new = GradStep([([w], 5e-4)], betas=(0.5, 0.9))
    new.load_state_dict(old.state_dict())
    group = new.optimizer.param_groups[0]
    assert (group["lr"], group["base_lr"], group["betas"]) == (5e-4, 5e-4, (0.5, 0.9))
    state = new.optimizer.state[w]
    assert torch.equal(state["exp_avg"], old.optimizer.state[w]["exp_avg"]) and int(state["step"]) == 1


def test_every_rule_is_in_the_documented_table():
    """docs/reliability.md's table names every key of RESUME_POLICY."""
    doc = (ROOT / "docs" / "reliability.md").read_text()
    section = doc[doc.index("## Changing settings on --resume") :]
    section = section[: section.index("\n## ", 1)]
    missing = [key for key in RESUME_POLICY if f"`{key}`" not in section and f"`{key}` (" not in section]
    assert not missing, missing
