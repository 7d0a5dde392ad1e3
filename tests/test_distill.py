"""One-step distillation: the regression phase on a linear-Gaussian teacher (closed-form targets), the backbone
pieces it uses (noiseless mean path, starts given, x0-prediction), and `rewardtune distill` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import LinearPolicy, QuadraticCost, QuadraticValueNet
from test_cli import TINY, cli

from rewardtune.algorithms.distill import DistillConfig, build_distill
from rewardtune.backbones.mlp import build_mlp_backbone
from rewardtune.nets.value import ValueFunction
from rewardtune.types import Teacher

D = 2
A = torch.tensor([0.8, 1.2])  # teacher slopes a_0, a_1
B = torch.tensor([[0.5, -1.0], [0.2, 0.3]])  # teacher offsets b_0, b_1
SIGMA = torch.tensor([0.6, 0.25])  # teacher noise levels sigma_0, sigma_1


def linear_teacher() -> Teacher:
    return Teacher(backbone=LinearPolicy((D,), A, B, SIGMA), reward=None, run_dir="<linear>")


def distil(teacher_noise: bool, steps: int = 1500, regression_sigma: float | None = None) -> LinearPolicy:
    student = LinearPolicy((D,), torch.ones(1), torch.zeros(1, D), torch.tensor([0.05]), learn_mean=True)
    config = DistillConfig(
        regression_steps=steps,
        regression_lr=2e-2,
        regression_sigma_lr=2e-2,
        teacher_noise=teacher_noise,
        regression_sigma=regression_sigma,
    )
    value = ValueFunction(QuadraticValueNet(D, 2), lr=1e-2)
    algorithm = build_distill(student, QuadraticCost(torch.zeros(D)), value, linear_teacher(), config=config)
    gen = torch.Generator().manual_seed(0)
    for i in range(steps):
        algorithm.regression_optimizer.set_lr_scale(1.0 if i < 0.7 * steps else 0.1)
        assert not algorithm.needs_rollout  # no rollout, so a learning reward stays as the teacher left it
        metrics = algorithm.update(torch.zeros(256, D), None, gen)  # the data batch sets the regression batch
        assert "distill/mse" in metrics
    assert algorithm.needs_rollout  # regression over: rollouts (and a learning reward's updates) start
    return student


def test_regression_on_the_noiseless_path_recovers_the_composed_linear_map():
    """mean_path(x_0) = a_1 (a_0 x_0 + b_0) + b_1 exactly, so the student's mean converges to that map and its sigma
    to the (vanishing) residual."""
    student = distil(teacher_noise=False)
    assert student.a.item() == pytest.approx(float(A[1] * A[0]), abs=2e-2)
    torch.testing.assert_close(student.b[0], A[1] * B[0] + B[1], rtol=0, atol=2e-2)
    assert student.sigma().item() < 0.05


def test_regression_with_teacher_noise_matches_the_linear_gaussian_marginal():
    """With the teacher's own noise, E[x_2 | x_0] is the same affine map and the residual variance per dimension is
    a_1^2 sigma_0^2 + sigma_1^2 (the closed-form linear-Gaussian chain): sigma_s must converge to its square root."""
    student = distil(teacher_noise=True)
    assert student.a.item() == pytest.approx(float(A[1] * A[0]), abs=3e-2)
    torch.testing.assert_close(student.b[0], A[1] * B[0] + B[1], rtol=0, atol=3e-2)
    expected = math.sqrt(float(A[1] ** 2 * SIGMA[0] ** 2 + SIGMA[1] ** 2))  # 0.763
    assert student.sigma().item() == pytest.approx(expected, rel=0.03)


def test_regression_sigma_is_held_while_the_mean_still_fits_the_linear_map():
    """With `regression_sigma` the residual no longer sets sigma_s: it is the given value from the start and stays
    there through regression (no gradient reaches it), while the mean converges to the same affine map."""
    student = distil(teacher_noise=True, steps=800, regression_sigma=0.2)
    assert student.sigma().item() == pytest.approx(0.2, rel=1e-6)
    assert student.a.item() == pytest.approx(float(A[1] * A[0]), abs=3e-2)
    torch.testing.assert_close(student.b[0], A[1] * B[0] + B[1], rtol=0, atol=3e-2)


@pytest.mark.parametrize("bad", [0.0, -0.1])
def test_regression_sigma_must_be_positive(bad):
    student = LinearPolicy((D,), torch.ones(1), torch.zeros(1, D), torch.tensor([0.05]), learn_mean=True)
    value = ValueFunction(QuadraticValueNet(D, 2), lr=1e-2)
    with pytest.raises(ValueError, match="regression_sigma must be > 0"):
        build_distill(student, QuadraticCost(torch.zeros(D)), value, linear_teacher(), config=DistillConfig(regression_sigma=bad))


def test_kl_safeguard_reference_is_the_regressed_student_and_is_checkpointed():
    """With kl_weight > 0, phase 2's KL reference is the student as regression left it (not its initialisation),
    and it is one of the algorithm's modules, so a resumed phase 2 gets it back from the checkpoint."""
    student = LinearPolicy((D,), torch.ones(1), torch.zeros(1, D), torch.tensor([0.05]), learn_mean=True)
    config = DistillConfig(regression_steps=20, regression_lr=5e-2, kl_weight=1.0, sampler_lr=1e-2)
    value = ValueFunction(QuadraticValueNet(D, 2), lr=1e-2)
    algorithm = build_distill(student, QuadraticCost(torch.zeros(D)), value, linear_teacher(), config=config)
    assert algorithm.modules()["reference"] is algorithm.dxdp.reference
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        algorithm.update(torch.zeros(64, D), None, gen)
    regressed = {k: v.clone() for k, v in student.state_dict().items()}
    assert not torch.equal(regressed["a"], initial["a"])  # regression moved the student
    algorithm.update(torch.zeros(64, D), student.sample(64, gen), gen)  # the first DxDP iteration
    reference = algorithm.dxdp.reference.state_dict()
    for name, value_ in regressed.items():
        torch.testing.assert_close(reference[name], value_, rtol=0, atol=0)
    assert not torch.equal(student.a, regressed["a"])  # the student itself moved on


def test_mean_path_and_given_starts():
    teacher = linear_teacher().backbone
    x0 = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(teacher.mean_path(x0), A[1] * (A[0] * x0 + B[0]) + B[1])
    trajectory = teacher.sample(4, torch.Generator().manual_seed(2), x0=x0)
    assert torch.equal(trajectory.states[0], x0)
    with pytest.raises(ValueError, match="x0 has shape"):
        teacher.sample(3, None, x0=x0)


def test_a_one_step_x0_prediction_backbone_outputs_its_network():
    """prediction = "sample" at T = 1 (strided from pure noise): the policy mean is the network's x_0 itself, while
    an eps-network's mean is 157 (x - eps): the conditioning a one-step student must avoid."""
    torch.manual_seed(0)
    policy = build_mlp_backbone((D,), num_steps=1, schedule="strided", prediction="sample", hidden=16, depth=2, time_dim=8)
    x = torch.randn(5, D)
    t = torch.zeros(5, dtype=torch.long)
    out = policy.eps_net(x, policy.timesteps[t]).view_as(x)
    torch.testing.assert_close(policy.mean(x, t), out, rtol=0, atol=1e-3)
    eps_policy = build_mlp_backbone((D,), num_steps=1, schedule="strided", hidden=16, depth=2, time_dim=8)
    assert eps_policy.coef_a.item() == pytest.approx(157.4, abs=0.1)
    with pytest.raises(ValueError, match="unknown prediction"):
        build_mlp_backbone((D,), prediction="velocity")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    from test_cli import rewardtune

    out = tmp_path_factory.mktemp("teacher") / "tiny"
    result = rewardtune("run", "recipes/tiny_8gaussians.toml", "--out", str(out), *TINY)
    assert result.returncode == 0, result.stderr
    return out


SHORT = ["--steps", "12", "--set", "algorithm.regression_steps=6", "--set", "algorithm.value_warmup=0",
         "--set", "train.eval_every=6", *TINY]


def test_distill_command_trains_a_one_step_student_that_sample_and_eval_use(teacher_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "student"
    code, _, err = cli(capsys, "distill", "recipes/distill_8gaussians.toml", "--teacher", str(teacher_run), "--out", str(out), *SHORT)
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 12 and math.isfinite(result["metrics"]["sliced_wasserstein"])
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("distill/mse" in r for r in log) and any("policy/loss" in r for r in log)  # both phases ran
    assert (out / "recipe.toml").read_text().count(str(teacher_run)) == 1
    code, _, err = cli(capsys, "sample", str(out), "-n", "50", "-o", str(tmp_path / "x.npy"))
    assert code == 0, err
    import numpy as np

    samples = np.load(tmp_path / "x.npy")
    assert samples.shape == (50, 2) and np.isfinite(samples).all()
    code, _, err = cli(capsys, "eval", str(out))
    assert code == 0, err
    # resuming the finished student is a no-op that keeps its result
    code, _, err = cli(capsys, "distill", "recipes/distill_8gaussians.toml", "--teacher", str(teacher_run), "--out", str(out), "--resume", *SHORT)
    assert code == 0, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["recipes/tiny_8gaussians.toml"], "has no [distill] table"),
        (["recipes/distill_8gaussians.toml", "--teacher", "/nonexistent/run"], "distill.teacher: /nonexistent/run does not exist"),
        (["recipes/distill_8gaussians.toml", "--set", "distill.teacher=''"], "[distill] needs a teacher"),
        (["recipes/distill_8gaussians.toml", "--set", "distill.techer=x"], "did you mean 'teacher'"),
        (["recipes/distill_8gaussians.toml", "--teacher", "runs", "--set", "backbone.num_steps=2"], None),
    ],
    ids=["no distill table", "missing teacher", "empty teacher", "misspelt key", "student with two steps"],
)
def test_distill_bad_input_is_one_line(args, message, tmp_path: Path, capsys, teacher_run: Path):
    if message is None:  # a student that is not one step, with a real teacher
        args = [a if a != "runs" else str(teacher_run) for a in args]
        message = "trains a one-step student: set backbone.num_steps = 1"
    code, _, err = cli(capsys, "distill", *args, "--out", str(tmp_path / "x"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_pretraining_run_cannot_lend_its_reward(tmp_path: Path, capsys):
    from test_cli import rewardtune

    pretrain = tmp_path / "ddpm"
    result = rewardtune("run", "recipes/ddpm_8gaussians.toml", "--out", str(pretrain), "--steps", "5", *TINY)
    assert result.returncode == 0, result.stderr
    code, _, err = cli(capsys, "distill", "recipes/distill_8gaussians.toml", "--teacher", str(pretrain), "--out", str(tmp_path / "s"))
    assert code == 2 and "has no reward" in err, err


def cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    ("restart", "expected"),
    [(False, [1.0, cosine(1 / 4), cosine(2 / 4), cosine(3 / 4)]), (True, [1.0, cosine(1 / 2), 1.0, cosine(1 / 2)])],
    ids=["one schedule", "restarted"],
)
def test_restart_lr_schedule_gives_phase_2_its_own_cosine(teacher_run: Path, restart: bool, expected: list[float]):
    """A cosine over 4 iterations, 2 of them regression: phase 2's first iteration runs at multiplier 0.5 when one
    schedule spans the run, and at 1.0 when `restart_lr_schedule` gives each phase its own cosine."""
    from rewardtune.api import make_accelerator, make_trainer
    from rewardtune.build import build_experiment
    from rewardtune.recipe import load_recipe
    from rewardtune.trainer import SilentReporter

    overrides = [
        f"distill.teacher={teacher_run}", "train.steps=4", "train.lr_schedule=cosine", "train.batch_size=16",
        "algorithm.regression_steps=2", "algorithm.value_warmup=0", f"algorithm.restart_lr_schedule={str(restart).lower()}",
    ]
    experiment = build_experiment(load_recipe("recipes/distill_8gaussians.toml", overrides))
    trainer = make_trainer(experiment, None, SilentReporter(), make_accelerator())
    scales = []
    for _ in range(4):
        trainer.train_step()
        group = trainer.algorithm.dxdp.optimizers()["sampler"].optimizer.param_groups[0]
        scales.append(group["lr"] / group["base_lr"])
        trainer.step += 1
    assert scales == pytest.approx(expected)


def test_phase_2_starts_avr_from_the_regressed_sigma():
    """AVR's s_t starts at sigma_t (Algorithm 1, line 2): for phase 2 that is the student's sigma_s as regression left
    it (`regression_sigma`), not the sigma it had when the algorithm was built."""
    student = LinearPolicy((D,), torch.ones(1), torch.zeros(1, D), torch.tensor([0.001]), learn_mean=True)
    config = DistillConfig(regression_steps=3, regression_sigma=0.3, tau_velocity=0.1, avr=False, value_warmup=10)
    value = ValueFunction(QuadraticValueNet(D, 2), lr=1e-2)
    algorithm = build_distill(student, QuadraticCost(torch.zeros(D)), value, linear_teacher(), config=config)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        algorithm.update(torch.zeros(16, D), None, gen)
    algorithm.update(torch.zeros(16, D), student.sample(16, gen), gen)  # the first DxDP iteration
    torch.testing.assert_close(algorithm.dxdp.s2, torch.tensor([0.09]), rtol=1e-5, atol=0)
