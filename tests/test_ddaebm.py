"""DDAEBM as a rewardtune algorithm: the recipes train, resume exactly, sample and refuse what they cannot do.

The maths (the penalty, the bounds, lambda, the sampler's marginals) is in test_ddaebm_maths.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import ROOT, cli
from test_image_recipes import tiny_cifar  # noqa: F401  (fixture: a tiny UNet and an image folder)
from test_resume import StopAt, final_weights

import rewardtune as rt
from rewardtune.algorithms.ddaebm import DDAEBM
from rewardtune.build import build_experiment
from rewardtune.errors import Interrupted, RecipeError
from rewardtune.recipe import load_recipe

TOY = ROOT / "recipes" / "ddaebm_8gaussians.toml"
DIGITS = ROOT / "recipes" / "ddaebm_digits.toml"
SHORT = ["train.steps=6", "train.eval_every=0", "train.log_every=2", "train.checkpoint_every=3", "eval.num_samples=300",
         "eval.repeats=1", "train.batch_size=32", "eval.plot=false"]


def test_the_toy_recipe_trains_and_resumes_bitwise(tmp_path: Path):
    recipe = rt.load_recipe(TOY, [*SHORT, "train.ema_decay=0.9"])
    straight = rt.run_recipe(recipe, tmp_path / "straight")
    with pytest.raises(Interrupted):
        rt.run_recipe(recipe, tmp_path / "resumed", reporter=StopAt(4))
    resumed = rt.run_recipe(recipe, tmp_path / "resumed", resume=True)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert any(k.startswith("encoder.") for k in a) and any(k.startswith("reward.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key  # generator, encoder, energy, EMA, both Adams, RNG
    assert resumed["metrics"] == straight["metrics"]
    assert {"sliced_wasserstein", "energy_auc", "mode_coverage"} <= set(straight["metrics"])


def test_an_iteration_moves_generator_encoder_and_energy_and_logs_both_bounds():
    experiment = build_experiment(load_recipe(TOY, ["train.batch_size=16"]))
    algorithm = experiment.algorithm
    assert isinstance(algorithm, DDAEBM) and not algorithm.needs_rollout
    before = {name: [p.detach().clone() for p in module.parameters()] for name, module in
              {"generator": experiment.backbone.generator, "encoder": algorithm.encoder, "energy": experiment.reward}.items()}
    real = experiment.data.sample(16, torch.Generator().manual_seed(0))
    metrics = algorithm.update(real, None, torch.Generator().manual_seed(1))
    assert {"energy/real", "energy/fake", "energy/penalty", "generator/reverse_kl_bound",
            "generator/forward_kl_bound"} <= set(metrics)
    for name, module in {"generator": experiment.backbone.generator, "encoder": algorithm.encoder,
                         "energy": experiment.reward}.items():
        assert any(not torch.equal(p, q) for p, q in zip(before[name], module.parameters())), name


@pytest.mark.parametrize(
    ("overrides", "forward_kl", "has_encoder"),
    [
        (["algorithm.divergence=kl"], False, True),  # KL only: no L2
        (["algorithm.encoder=false"], False, False),  # no q_psi: a WGAN-0GP per level
        (["backbone.latent_dim=0"], False, False),  # z = 0
    ],
)
def test_the_ablation_switches_drop_their_terms(overrides, forward_kl, has_encoder):
    experiment = build_experiment(load_recipe(TOY, ["train.batch_size=16", *overrides]))
    algorithm = experiment.algorithm
    metrics = algorithm.update(experiment.data.sample(16, torch.Generator().manual_seed(0)), None,
                               torch.Generator().manual_seed(1))
    assert ("generator/forward_kl_bound" in metrics) is forward_kl
    assert ("encoder" in algorithm.modules()) is has_encoder


def test_the_digits_recipe_trains_and_samples_images(tmp_path: Path, capsys):
    code, _, err = cli(capsys, "run", str(DIGITS), "--out", str(tmp_path / "run"), "--set", "train.steps=2",
                       "--set", "train.eval_every=0", "--set", "eval.num_samples=32", "--set", "train.batch_size=8",
                       "--set", "eval.keep_best=", "--set", "eval.plot=false")
    assert code == 0, err
    code, _, err = cli(capsys, "sample", str(tmp_path / "run"), "-n", "6", "-o", str(tmp_path / "s.npz"))
    assert code == 0, err
    samples = np.load(tmp_path / "s.npz")
    images = samples[samples.files[0]]
    assert images.shape == (6, 1, 8, 8) and images.min() >= -1 and images.max() <= 1


def test_sample_on_a_toy_run_and_its_refusals(tmp_path: Path, capsys):
    recipe = rt.load_recipe(TOY, SHORT[:1] + ["train.steps=1", "eval.num_samples=100", "eval.repeats=1"])
    rt.run_recipe(recipe, tmp_path / "run")
    code, _, err = cli(capsys, "sample", str(tmp_path / "run"), "-n", "5", "-o", str(tmp_path / "s.npz"))
    assert code == 0, err
    code, _, err = cli(capsys, "sample", str(tmp_path / "run"), "-n", "5", "-o", str(tmp_path / "g.npz"), "--guidance", "1")
    assert code == 2 and "value guidance" in err and "Traceback" not in err
    # a DDAEBM run as another run's starting generator (backbone.init_from), its EMA weights
    experiment = build_experiment(load_recipe(TOY, [f"backbone.init_from={tmp_path / 'run'}"]))
    weights = final_weights(tmp_path / "run")
    for key, value in experiment.backbone.network_state().items():
        assert torch.equal(value, weights[f"ema.{key}"]), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.divergence=jeffreys"], "divergence"),
        (["algorithm.gamma=-1"], ">= 0"),
        (["backbone.network=unet"], "images"),
        (["reward.network=unet"], "is for images"),
    ],
)
def test_bad_ddaebm_recipes_are_one_line_errors(tmp_path: Path, capsys, overrides, message):
    args = [a for o in overrides for a in ("--set", o)]
    code, _, err = cli(capsys, "run", str(TOY), "--out", str(tmp_path / "run"), *args, "--set", "train.steps=1")
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_ddaebm_on_a_gaussian_backbone_is_refused(tmp_path: Path, capsys):
    text = TOY.read_text()
    start, end = text.index("[backbone]"), text.index("[reward]")
    path = tmp_path / "recipe.toml"
    path.write_text(text[:start] + "[backbone]\nkind = \"mlp\"\nnum_steps = 4\n\n" + text[end:])
    code, _, err = cli(capsys, "run", str(path), "--out", str(tmp_path / "run"), "--set", "train.steps=1")
    assert code == 2 and "needs [backbone] kind = \"posterior_sampling\"" in err and "Traceback" not in err


def test_time_energy_with_another_algorithm_is_refused(tmp_path: Path):
    text = (ROOT / "recipes" / "tiny_8gaussians.toml").read_text()
    start = text.index("[reward]")
    end = text.index("[", start + 1)
    path = tmp_path / "recipe.toml"
    path.write_text(text[:start] + "[reward]\nkind = \"time_energy\"\n\n" + text[end:])
    recipe = load_recipe(path)
    with pytest.raises(RecipeError, match="trained by its algorithm"):
        build_experiment(recipe)


def test_the_cifar10_recipe_runs_with_local_stand_ins(tiny_cifar, tmp_path: Path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(ROOT)
    _, images = tiny_cifar
    small = []
    for part in ("backbone", "reward"):  # the recipe's UNets at a tenth of their width, one block per level
        small += ["--set", f"{part}.unet.block_out_channels=[8, 16, 16, 16]", "--set", f"{part}.unet.layers_per_block=1",
                  "--set", f"{part}.unet.norm_num_groups=4"]
    code, _, err = cli(capsys, "run", "recipes/ddaebm_cifar10.toml", "--out", str(tmp_path / "run"), "--steps", "2",
                       "--set", "data.kind=image_folder", "--set", f"data.path={images}", "--set", "data.size=32",
                       "--set", "train.batch_size=4", "--set", "eval.num_samples=16",
                       "--set", "eval.feature_extractor=helpers:tiny_features", *small)
    assert code == 0, err
    experiment_recipe = (tmp_path / "run" / "recipe.toml").read_text()
    assert "latent_dim = 100" in experiment_recipe and "ema_decay = 0.9999" in experiment_recipe


def test_checkpoints_with_the_retired_alpha_bars_buffer_still_load(tmp_path: Path):
    """Checkpoints written before the posterior sampler dropped its unused `alpha_bars` copy (2026-12-01) hold it for
    the backbone and its EMA; they load (the key is forgotten), and any other unexpected key is still refused."""
    from safetensors.torch import load_file, save_file

    from rewardtune import checkpoint as ckpt
    from rewardtune.api import load_run
    from rewardtune.errors import CheckpointError

    rt.run_recipe(rt.load_recipe(TOY, [*SHORT, "train.steps=3", "train.ema_decay=0.9"]), tmp_path / "run")
    weights_file = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") / "model.safetensors"
    weights = load_file(weights_file)
    assert "backbone.alpha_bars" not in weights and any(k.startswith("ema.") for k in weights)
    current = load_run(tmp_path / "run").backbone.state_dict()
    save_file({**weights, "backbone.alpha_bars": torch.rand(5), "ema.alpha_bars": torch.rand(5)}, weights_file)
    loaded = load_run(tmp_path / "run").backbone.state_dict()
    assert all(torch.equal(loaded[k], current[k]) for k in current)
    save_file({**weights, "backbone.bogus": torch.rand(5)}, weights_file)
    with pytest.raises(CheckpointError, match="bogus"):
        load_run(tmp_path / "run")
