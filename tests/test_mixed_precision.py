"""Mixed precision and non-finite steps ([train] mixed_precision, skip_nonfinite): bf16 autocast runs end to end on
the CPU with fp32 log-probs, states and values; fp16 loss scaling backs off on overflow; a non-finite step is skipped
and counted when asked, and stops the run otherwise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import rewardtune as rt
from rewardtune.errors import NonFiniteError
from rewardtune.optim import GradStep

ROOT = Path(__file__).resolve().parents[1]


def tiny(*overrides: str):
    return rt.build_trainer(rt.load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml", ["train.steps=3", *overrides]))


def test_bf16_autocast_keeps_log_probs_states_and_values_in_fp32():
    trainer = tiny("train.mixed_precision=bf16")
    with trainer.autocast():
        trajectory = trainer.backbone.sample(8, torch.Generator().manual_seed(0))
        eps = trainer.backbone.eps_net(trajectory.states[0].flatten(1), trainer.backbone.timesteps[:1].expand(8))
        value = trainer.algorithm.value(trajectory.final, torch.full((8,), 3))
        t = torch.zeros(8, dtype=torch.long)
        log_prob = trainer.backbone.log_prob(trajectory.states[1], trajectory.states[0], t)
    assert eps.dtype == torch.bfloat16  # the network did run in bf16 ...
    assert trajectory.states.dtype == trajectory.log_probs.dtype == value.dtype == log_prob.dtype == torch.float32
    exact = trainer.backbone.log_prob(trajectory.states[1], trajectory.states[0], t)  # fp32 throughout
    torch.testing.assert_close(log_prob, exact, rtol=0.05, atol=0.5)  # only the network's bf16 rounding differs


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("module", ["value", "backbone", "energy"])
def test_a_forward_after_an_optimiser_step_in_the_same_autocast_region_uses_the_new_weights(precision, module):
    """An iteration steps the value T times, the energy, and the sampler inside one autocast region: with torch's
    weight cache the forwards after a step would still use the low-precision copies of the weights from before it.
    Each network, each low precision."""
    trainer = tiny(f"train.mixed_precision={precision}")
    x, t = torch.randn(16, 2), torch.full((16,), 3)
    if module == "value":
        net, opt = (lambda: trainer.algorithm.value(x, t)), trainer.algorithm.optimizers()["value"]
    elif module == "backbone":
        net, opt = (lambda: trainer.backbone.eps_net(x, t.float())), trainer.algorithm.optimizers()["sampler"]
    else:  # the energy is the value at time T here (shared network), called through the reward
        net, opt = (lambda: -trainer.reward.cost(x)), trainer.algorithm.optimizers()["value"]
    opt.configure(loss_scaling=False)
    with trainer.autocast():
        before = net()
        opt.step(before.float().pow(2).mean())
        after = net()
    with trainer.autocast():
        fresh = net()  # a new region: no cache either way
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


def test_a_bf16_run_trains_and_evaluates(tmp_path):
    trainer = tiny("train.mixed_precision=bf16", "train.skip_nonfinite=true")
    trainer.out_dir = None
    metrics = trainer.train_step()
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["skipped_steps"] == 0.0
    assert math.isfinite(trainer.evaluate()["sliced_wasserstein"])


def step_with(loss_of, opt: GradStep, weight: torch.nn.Parameter) -> float:
    return opt.step(loss_of(weight))


def test_a_nonfinite_step_is_skipped_and_counted_when_asked_and_taken_otherwise():
    weight = torch.nn.Parameter(torch.ones(3))
    opt = GradStep([([weight], 0.1)])
    opt.configure(skip_nonfinite=True)
    step_with(lambda w: (w * float("nan")).sum(), opt, weight)
    assert opt.skipped == 1 and torch.equal(weight.detach(), torch.ones(3))  # not taken
    step_with(lambda w: w.sum(), opt, weight)
    assert opt.skipped == 1 and not torch.equal(weight.detach(), torch.ones(3))  # a finite step is taken
    plain = GradStep([([weight], 0.1)])
    step_with(lambda w: (w * float("nan")).sum(), plain, weight)
    assert plain.skipped == 0 and bool(weight.isnan().all())  # without the option: taken, the run's check stops it


def test_fp16_loss_scaling_backs_off_on_overflow_and_stops_when_the_scale_is_spent():
    weight = torch.nn.Parameter(torch.ones(3))
    opt = GradStep([([weight], 0.1)])
    opt.configure(loss_scaling=True)
    start = opt.scaler.get_scale()
    step_with(lambda w: (w * 1e36).sum(), opt, weight)  # 1e36 x 65536 overflows: skip, halve the scale
    assert opt.skipped == 1 and opt.scaler.get_scale() == start / 2 and torch.equal(weight.detach(), torch.ones(3))
    step_with(lambda w: w.sum(), opt, weight)
    assert not torch.equal(weight.detach(), torch.ones(3))  # an ordinary step goes through the scaler
    opt.scaler.update(1.0)
    with pytest.raises(NonFiniteError, match="non-finite under fp16 loss scaling down to scale 1"):
        step_with(lambda w: (w * float("inf")).sum(), opt, weight)
    opt.configure(loss_scaling=True, skip_nonfinite=True)
    opt.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    step_with(lambda w: (w * float("inf")).sum(), opt, weight)
    assert opt.skipped == 2


def test_the_skipped_count_is_checkpointed_and_resumed(tmp_path):
    recipe = rt.load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml",
                            ["train.steps=2", "train.checkpoint_every=2", "train.skip_nonfinite=true"])
    rt.run_recipe(recipe, tmp_path / "run")
    trainer = rt.api.load_run(tmp_path / "run")
    assert trainer.total_skipped_steps() == 0
    trainer.skipped_steps = 5
    trainer.commit()
    assert rt.api.load_run(tmp_path / "run").total_skipped_steps() == 5


class CastOutput(torch.nn.Module):
    """A stand-in backbone whose samples come out in a given dtype (as a decoder under autocast gives them)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def sample(self, n, generator=None, guide=None, condition=None):
        from types import SimpleNamespace

        return SimpleNamespace(final=torch.randn(n, 3, 4, 4, generator=generator, dtype=torch.float64))

    def output(self, x):
        return x.to(self.dtype)


@pytest.mark.parametrize(("dtype", "expected"), [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                  (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_samples_are_at_least_fp32_whatever_decoded_them(dtype, expected):
    from rewardtune.evaluation import draw_samples

    samples = draw_samples(CastOutput(dtype), 5, torch.Generator().manual_seed(0), None, 2)
    assert samples.dtype == expected and samples.shape == (5, 3, 4, 4)


@pytest.mark.parametrize(("precision", "output"), [("bf16", "s.npy"), ("fp16", "s.npz"), ("bf16", "grid.png")])
def test_a_mixed_precision_run_samples_to_every_format(precision, output, tmp_path, capsys):
    from test_cli import cli

    recipe = ROOT / "recipes" / "tiny_8gaussians.toml"
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"), "--set", "train.steps=2",
                       "--set", f"train.mixed_precision={precision}")
    assert code == 0, err
    if precision == "fp16":  # its loss scaling's skipped overflow steps are reported, and they do not stop the run
        records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
        assert any("skipped_steps" in r for r in records)
    code, _, err = cli(capsys, "sample", str(tmp_path / "run"), "-n", "16", "-o", str(tmp_path / output))
    if output.endswith(".png"):  # vectors: no image grid, and the refusal says so in one line
        assert code == 2 and err.count("\n") == 1, err
        return
    assert code == 0, err
    samples = np.load(tmp_path / output)
    samples = samples["samples"] if output.endswith(".npz") else samples
    assert samples.dtype == np.float32 and samples.shape == (16, 2) and np.isfinite(samples).all()


def test_a_precision_that_slows_a_cpu_run_is_warned_about(monkeypatch):
    """bf16 helps a CPU only with bf16 instructions (AMX / AVX512-BF16; 1.7x on the shapes recipe, docs/results.md),
    and fp16 never does: a warning line says so and names the setting; a GPU, fp32 and a bf16-capable CPU get none."""
    from rewardtune import precision

    cpu = torch.device("cpu")
    assert precision.slow_precision_warning(cpu, "no") is None
    assert precision.slow_precision_warning(torch.device("cuda"), "bf16") is None
    assert precision.slow_precision_warning(torch.device("cuda"), "fp16") is None
    assert "fp16" in precision.slow_precision_warning(cpu, "fp16")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.slow_precision_warning(cpu, "bf16") is None
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    line = precision.slow_precision_warning(cpu, "bf16")
    assert "--set train.mixed_precision=no" in line and "\n" not in line


def test_the_slow_precision_warning_reaches_the_command_line(monkeypatch, tmp_path, capsys):
    from test_cli import cli

    from rewardtune import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    recipe = ROOT / "recipes" / "tiny_8gaussians.toml"
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"), "--set", "train.steps=1",
                       "--set", "train.mixed_precision=bf16")
    assert code == 0, err
    assert "warning: train.mixed_precision = \"bf16\" on a CPU without bf16 instructions" in err
