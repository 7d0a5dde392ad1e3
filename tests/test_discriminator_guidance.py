"""Algorithm `discriminator_guidance`: the frozen sampler stays frozen, the DSM residual and the guided step are the
formulas of the module docstring, and the digits recipe trains and samples with guidance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import ROOT, cli
from test_image_recipes import tiny_cifar  # noqa: F401  (fixture: a tiny UNet and an image folder)
from torch import nn

import rewardtune as rt
from rewardtune import api
from rewardtune.algorithms.discriminator_guidance import (
    DiscriminatorGuidance,
    build_discriminator_guidance,
)
from rewardtune.backbones.mlp import build_mlp_backbone
from rewardtune.errors import RecipeError


class LinearDiscriminator(nn.Module):
    """d(x, t) = <a, x> (+ 0 t): grad_x d = a everywhere."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ self.a + 0 * t

    def input_gradient(self, x, t, *, create_graph=False):
        return self.a.expand_as(x) if create_graph else self.a.detach().expand_as(x).clone()


def algorithm(a=(0.3, -0.2)) -> DiscriminatorGuidance:
    torch.manual_seed(0)
    backbone = build_mlp_backbone((2,), num_steps=4, hidden=16, depth=2)
    return DiscriminatorGuidance(backbone, LinearDiscriminator(torch.tensor(a)), loss="hybrid")


def test_the_dsm_residual_is_the_eps_residual_minus_the_scaled_correction():
    alg = algorithm()
    gen = torch.Generator().manual_seed(0)
    x_t, noise = torch.randn(6, 2, generator=gen), torch.randn(6, 2, generator=gen)
    t = torch.tensor([0, 1, 2, 3, 1, 2])
    ab = alg.backbone.step_alphas_cumprod[t]
    with torch.no_grad():
        eps = alg.backbone.predict_eps(x_t, alg.backbone.timesteps[t], ab)
    assert torch.allclose(alg.backbone.state_noise(t)[1], (1 - ab).sqrt())
    expected = ((eps - noise) - (1 - ab).sqrt()[:, None] * alg.discriminator.a).pow(2).sum(1).mean()
    assert torch.allclose(alg.dsm_residual(x_t, noise, t), expected)


def test_the_guided_step_adds_the_variance_scaled_gradient():
    alg = algorithm()
    x = torch.randn(5, 2)
    guided = alg.guide(1.5)(x, 2, torch.tensor(0.4))
    assert torch.allclose(guided, x + 1.5 * 0.16 * alg.discriminator.a.detach())


def test_an_update_trains_the_discriminator_and_leaves_the_sampler_frozen():
    torch.manual_seed(0)
    backbone = build_mlp_backbone((2,), num_steps=4, hidden=16, depth=2)
    alg = build_discriminator_guidance(backbone, loss="hybrid", hidden=16, depth=2)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    disc_before = [p.detach().clone() for p in alg.discriminator.parameters()]
    trajectory = backbone.sample(32, torch.Generator().manual_seed(1))
    metrics = alg.update(torch.randn(32, 2), trajectory, torch.Generator().manual_seed(2))
    assert {"discriminator/bce", "discriminator/dsm_residual"} <= set(metrics)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert any(not torch.equal(p, q) for p, q in zip(disc_before, alg.discriminator.parameters()))


def test_bad_settings_are_recipe_errors():
    backbone = build_mlp_backbone((2,), num_steps=4, hidden=16, depth=2)
    with pytest.raises(RecipeError, match="loss"):
        build_discriminator_guidance(backbone, loss="wgan")
    with pytest.raises(RecipeError, match="gamma"):
        build_discriminator_guidance(backbone, gamma=-1.0)
    from rewardtune.backbones.posterior import build_posterior_sampling_backbone

    with pytest.raises(RecipeError, match="declares its states' noise"):
        build_discriminator_guidance(build_posterior_sampling_backbone((2,)))


def test_the_digits_recipe_trains_and_samples_with_guidance(tmp_path: Path, capsys):
    run = tmp_path / "run"
    code, _, err = cli(capsys, "run", str(ROOT / "recipes" / "dg_digits.toml"), "--out", str(run), "--set",
                       "backbone.init_from=", "--set", "train.steps=3", "--set", "train.eval_every=0", "--set",
                       "eval.num_samples=64", "--set", "train.batch_size=16", "--set", "algorithm.width=8")
    assert code == 0, err
    code, _, err = cli(capsys, "sample", str(run), "-n", "4", "-o", str(tmp_path / "s.npz"), "--guidance", "2")
    assert code == 0, err
    code, _, err = cli(capsys, "sample", str(run), "-n", "5", "-o", str(tmp_path / "r.npz"), "--rejection", "budgeted",
                       "--budget", "3")
    assert code == 0, err
    assert np.load(tmp_path / "r.npz")["samples"].shape == (5, 1, 8, 8)
    for bad, message in ((["--rejection", "top-k"], "--rejection 'top-k': expected one of drs, budgeted"),
                         (["--rejection", "budgeted", "--budget", "0.5"], "--budget must be >= 1")):
        code, _, err = cli(capsys, "sample", str(run), "-n", "5", "-o", str(tmp_path / "r.npz"), *bad)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    # what the rule keeps: samples the discriminator finds more data-like than the proposals on average
    trainer = rt.load_run(run)
    proposals = trainer.algorithm.log_ratio(api.sample_trainer(trainer, 200, seed=2)[0]).mean()
    for rule in ("budgeted", "drs"):
        kept = api.sample_by_rejection(trainer, 100, rule, 4.0, seed=1, calibration=200)
        assert kept.shape == (100, 1, 8, 8) and float(trainer.algorithm.log_ratio(kept).mean()) > float(proposals)


def test_rejection_needs_a_density_ratio_and_an_unconditional_run():
    from types import SimpleNamespace

    with pytest.raises(RecipeError, match="needs a run that estimates a density ratio"):
        api.sample_by_rejection(SimpleNamespace(algorithm=object(), conditions=None), 4, "drs", 2.0)
    with pytest.raises(RecipeError, match="conditional runs are not supported"):
        api.sample_by_rejection(SimpleNamespace(algorithm=algorithm(), conditions=object()), 4, "drs", 2.0)


def test_the_log_ratio_is_the_discriminator_at_the_clean_level():
    alg = algorithm(a=(0.3, -0.2))
    x = torch.randn(7, 2)
    torch.testing.assert_close(alg.log_ratio(x), x @ torch.tensor([0.3, -0.2]))


def test_an_edm_backbone_declares_its_states_noise_and_eps():
    from helpers import tiny_edm_network

    from rewardtune.backbones.edm import EDMChainPolicy

    torch.manual_seed(0)
    backbone = EDMChainPolicy(tiny_edm_network(), (3, 8, 8), num_steps=4)
    t = torch.tensor([0, 2, 3])
    a, s = backbone.state_noise(t)
    assert torch.equal(a, torch.ones(3)) and torch.equal(s, backbone.sigmas[t])
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = (x - backbone.denoise(x, backbone.sigmas[t])) / backbone.sigmas[t].view(-1, 1, 1, 1)
        assert torch.allclose(backbone.state_eps(x, t), expected)
    alg = build_discriminator_guidance(backbone, loss="hybrid", width=8)
    trajectory = backbone.sample(4, torch.Generator().manual_seed(1))
    assert "discriminator/dsm_residual" in alg.update(torch.rand(4, 3, 8, 8) * 2 - 1, trajectory, torch.Generator())


def test_the_edm_cifar10_recipe_runs_with_local_stand_ins(tiny_cifar, tmp_path: Path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(ROOT)
    _, images = tiny_cifar
    code, _, err = cli(capsys, "run", "recipes/dg_cifar10_edm.toml", "--out", str(tmp_path / "run"), "--steps", "2",
                       "--set", "data.kind=image_folder", "--set", f"data.path={images}", "--set", "data.size=8",
                       "--set", "backbone.network=helpers:tiny_edm_network", "--set", "backbone.num_steps=3",
                       "--set", "algorithm.width=8", "--set", "train.batch_size=4", "--set", "eval.num_samples=16",
                       "--set", "eval.feature_extractor=helpers:tiny_features")
    assert code == 0, err


def test_the_gmm_recipe_trains_a_vector_discriminator_on_the_exact_mixture_and_evaluates_guided(tmp_path: Path, capsys):
    run = tmp_path / "run"
    code, _, err = cli(capsys, "run", str(ROOT / "recipes" / "dg_gmm.toml"), "--out", str(run), "--steps", "3",
                       "--set", "eval.num_samples=200", "--set", "eval.repeats=1", "--set", "train.eval_every=3")
    assert code == 0, err
    metrics = json.loads((run / "eval.json").read_text())["metrics"]
    assert {"sliced_wasserstein", "mode_coverage", "min_mode_mass"} <= set(metrics)
    code, _, err = cli(capsys, "sample", str(run), "-n", "6", "-o", str(tmp_path / "s.npz"), "--guidance", "1")
    assert code == 0, err
    assert np.load(tmp_path / "s.npz")["samples"].shape == (6, 2)
