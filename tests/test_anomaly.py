"""Anomaly detection (DxMI §5.3): the sphere projection, the autoencoder energy whose decoder stays on the sphere,
the sphere policy, the noised-data prior's distribution, the feature pipeline (grid resizing, timm with local
weights, the offline error, user factories, the cache), and the MVTec recipe end to end on a synthetic folder in
the dataset's layout with a tiny random extractor, through `rewardtune run` and `rewardtune score`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from torch import nn

from rewardtune.anomaly.features import (
    build_feature_extractor,
    cached_features,
    features_cache_path,
    resize_to_grid,
)
from rewardtune.anomaly.sets import write_mvtec_layout
from rewardtune.backbones.priors import NoisedDataPrior, build_noised_data_prior
from rewardtune.backbones.sphere import build_sphere_mlp_backbone
from rewardtune.errors import PluginNotFoundError, RecipeError
from rewardtune.nets.autoencoder import SphereAutoencoder, to_sphere
from rewardtune.rewards.autoencoder import build_autoencoder_reward

REPO = Path(__file__).resolve().parents[1]




class VectorData:
    """Data of fixed vectors [N, D], drawn uniformly."""

    def __init__(self, vectors: torch.Tensor) -> None:
        self.vectors = vectors
        self.sample_shape = (vectors.shape[1],)

    def sample(self, n, generator=None, device="cpu"):
        idx = torch.randint(0, self.vectors.shape[0], (n,), generator=generator)
        return self.vectors[idx].to(device)


class IdentityAutoencoder(nn.Module):
    """Enc = Dec = identity (latent = data space), optionally projecting onto the sphere."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # so the module has a device

    def encode(self, x):
        return x

    def decode(self, z):
        return z


# ---- the sphere ------------------------------------------------------------------------------------------------
def test_sphere_projection_gives_unit_vectors_and_keeps_directions():
    x = torch.randn(64, 17) * torch.rand(64, 1) * 10
    y = to_sphere(x)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(64))
    torch.testing.assert_close(y * x.norm(dim=-1, keepdim=True), x)  # same direction, only the length changes
    assert torch.isfinite(to_sphere(torch.zeros(2, 3))).all()


def test_decoder_stays_on_the_sphere_and_energy_is_two_minus_two_cosine():
    torch.manual_seed(0)
    ae = SphereAutoencoder(12, latent=4, hidden=16, depth=2)
    z = torch.randn(50, 4) * 5
    torch.testing.assert_close(ae.decode(z).norm(dim=-1), torch.ones(50))
    x = to_sphere(torch.randn(50, 12))
    cosine = (x * ae.decode(ae.encode(x))).sum(-1)
    torch.testing.assert_close(ae.energy(x), 2 - 2 * cosine, atol=1e-5, rtol=1e-5)
    assert ((ae.energy(x) >= 0) & (ae.energy(x) <= 4 + 1e-5)).all()


def test_pretraining_lowers_the_reconstruction_error_of_the_data():
    torch.manual_seed(0)
    directions = to_sphere(torch.randn(3, 8))  # data: three directions with a little spread
    data = VectorData(to_sphere(directions.repeat(100, 1) + 0.05 * torch.randn(300, 8)))
    untrained = build_autoencoder_reward((8,), data, latent=4, hidden=32, depth=2, pretrain_steps=0)
    trained = build_autoencoder_reward((8,), data, latent=4, hidden=32, depth=2, pretrain_steps=300,
                                       pretrain_batch=64, pretrain_lr=3e-3)
    x = data.vectors
    assert trained.cost(x).mean() < 0.1 * untrained.cost(x).mean()
    torch.testing.assert_close(trained(x), -trained.autoencoder.energy(x))  # reward = -E


def test_autoencoder_reward_refuses_images():
    with pytest.raises(ValueError, match="vectors"):
        build_autoencoder_reward((1, 8, 8), None, pretrain_steps=0)


def test_sphere_policy_mean_and_sample_lie_on_the_sphere_and_start_as_the_identity():
    torch.manual_seed(0)
    policy = build_sphere_mlp_backbone((10,), num_steps=3, hidden=16, depth=2, initial_sigma=0.05)
    x = to_sphere(torch.randn(32, 10))
    t = torch.zeros(32, dtype=torch.long)
    torch.testing.assert_close(policy.mean(x, t), x)  # f_phi = 0 at the start: the mean is x_t itself
    with torch.no_grad():
        policy.net.body[-1].bias.normal_()
    torch.testing.assert_close(policy.mean(x, t).norm(dim=-1), torch.ones(32))
    trajectory = policy.sample(32, torch.Generator().manual_seed(0))
    torch.testing.assert_close(policy.output(trajectory.final).norm(dim=-1), torch.ones(32))
    # the step is Gaussian around the mean: the log-prob is torch.distributions' Normal
    x1 = policy.step(x, t, torch.randn(32, 10))
    expected = torch.distributions.Normal(policy.mean(x, t), policy.sigma()[0]).log_prob(x1).sum(-1)
    torch.testing.assert_close(policy.log_prob(x1, x, t), expected)


# ---- the noised-data prior -------------------------------------------------------------------------------------
def test_noised_data_prior_without_noise_is_the_data_reconstructed():
    torch.manual_seed(0)
    data = VectorData(to_sphere(torch.randn(40, 6)))
    ae = SphereAutoencoder(6, latent=3, hidden=8, depth=1)
    prior = NoisedDataPrior(data, ae, 0.0)
    x0 = prior.sample(40, (6,), torch.Generator().manual_seed(1), "cpu")
    drawn = data.sample(40, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x0, ae.decode(ae.encode(drawn)))
    assert not any(p.requires_grad for p in prior.parameters())


def test_noised_data_prior_adds_latent_gaussian_noise_of_the_stated_scale():
    """With an identity autoencoder and no projection, x_0 - x ~ N(0, s^2 I); s = noise_scale x the latents' mean
    per-dimension std (here the data's)."""
    torch.manual_seed(0)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    data = VectorData(x)
    prior = NoisedDataPrior(data, IdentityAutoencoder(), 0.3, sphere=False)
    draws = prior.sample(20000, (4,), torch.Generator().manual_seed(0), "cpu") - x
    assert draws.mean(0).abs().max() < 0.01
    torch.testing.assert_close(draws.std(0), torch.full((4,), 0.3), atol=0.01, rtol=0)
    # on the sphere: E ||x_0 - x||^2 = 2 - 2 E cos, with cos = (1 + s e1) / sqrt((1 + s e1)^2 + s^2 chi2_3)
    on_sphere = NoisedDataPrior(data, IdentityAutoencoder(), 0.3).sample(20000, (4,), torch.Generator().manual_seed(1), "cpu")
    torch.testing.assert_close(on_sphere.norm(dim=-1), torch.ones(20000))
    e = torch.randn(200000, 4, generator=torch.Generator().manual_seed(2))
    cos = (1 + 0.3 * e[:, 0]) / ((1 + 0.3 * e[:, 0]) ** 2 + 0.09 * e[:, 1:].pow(2).sum(-1)).sqrt()
    assert abs(float(on_sphere[:, 0].mean() - cos.mean())) < 0.01
    # the factory scales the noise to the latents' spread
    spread = VectorData(torch.randn(5000, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]))

    class Reward:
        autoencoder = IdentityAutoencoder()

    built = build_noised_data_prior(spread, Reward(), noise_scale=0.5, reference=5000)
    assert math.isclose(float(built.noise), 0.5 * 2.5, rel_tol=0.05)


def test_noised_data_prior_needs_an_autoencoder_reward():
    class Energy:
        pass

    with pytest.raises(ValueError, match="autoencoder"):
        build_noised_data_prior(VectorData(torch.randn(4, 3)), Energy())


# ---- features ----------------------------------------------------------------------------------------------------
def test_resize_to_grid_pools_larger_maps_and_upsamples_smaller_ones():
    big = torch.arange(16.0).view(1, 1, 4, 4)
    small = torch.tensor([[[[0.0, 4.0]]]]).expand(1, 1, 2, 2).contiguous()  # left column 0, right column 4
    out = resize_to_grid([big, small], 2)
    assert out.shape == (1, 2, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))  # 2 x 2 block means
    torch.testing.assert_close(out[0, 1], small[0, 0])
    up = resize_to_grid([small], 4)[0, 0, 0]
    torch.testing.assert_close(up, torch.tensor([0.0, 1.0, 3.0, 4.0]))  # bilinear, align_corners=False


def test_digits_cnn_features_are_96_by_8_by_8():
    extractor = build_feature_extractor("digits_cnn")
    maps = extractor(torch.rand(3, 1, 32, 32))
    assert maps.shape == (3, 96, 8, 8) and (maps >= 0).all()


def test_timm_extractor_loads_local_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False)
    path = tmp_path / "efficientnet_b0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = build_feature_extractor("efficientnet_b0", layers=(0, 1, 2, 3), grid=4, image_size=64, weights=str(path))
    assert loaded(torch.rand(2, 3, 48, 48)).shape == (2, 16 + 24 + 40 + 112, 4, 4)
    first_conv = dict(loaded.body.named_parameters())["conv_stem.weight"]
    torch.testing.assert_close(first_conv, model.conv_stem.weight)  # the file's weights, not fresh random ones
    with pytest.raises(RecipeError, match="do not exist"):
        build_feature_extractor("efficientnet_b0", weights=str(tmp_path / "missing.safetensors"))


def test_timm_extractor_offline_and_unknown_names_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError) as err:
        build_feature_extractor("efficientnet_b0", pretrained=True)
    assert "\n" not in str(err.value) and "weights =" in str(err.value)
    with pytest.raises(RecipeError, match="unknown feature extractor"):
        build_feature_extractor("no_such_net")
    with pytest.raises(PluginNotFoundError, match="cannot import module"):
        build_feature_extractor("no_such_module:factory")


def tiny_extractor() -> nn.Module:
    """A user factory: a random 3-channel conv net with two feature maps."""
    torch.manual_seed(0)

    class Net(nn.Module):
        channels = 3

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return [h, torch.relu(self.b(h))]

    return Net()


def test_user_factory_extractor():
    extractor = build_feature_extractor("tests.test_anomaly:tiny_extractor", grid=4, image_size=None)
    assert extractor(torch.rand(2, 1, 16, 16)).shape == (2, 10, 4, 4)  # grey images repeated to 3 channels


def test_features_are_cached_by_their_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("REWARDTUNE_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"train": torch.randn(2, 3, 4, 4)}

    first = cached_features({"a": 1}, compute, True)
    second = cached_features({"a": 1}, compute, True)
    other = cached_features({"a": 2}, compute, True)
    assert len(calls) == 2 and torch.equal(first["train"], second["train"])
    assert not torch.equal(first["train"], other["train"])
    assert features_cache_path({"a": 1}).exists()
    cached_features({"a": 1}, compute, False)
    assert len(calls) == 3


# ---- the MVTec recipe end to end ---------------------------------------------------------------------------------
TINY = [
    "data.extractor=efficientnet_b0", "data.pretrained=false", "data.image_size=32", "data.grid=4",
    "data.cache=false", "backbone.hidden=32", "value.hidden=32", "reward.latent=8", "reward.hidden=32",
    "reward.pretrain_steps=20", "reward.pretrain_batch=64", "train.steps=4", "train.batch_size=32",
    "algorithm.policy_batch=32", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2",
    "eval.num_samples=64",
]


@pytest.fixture(scope="module")
def mvtec_run(tmp_path_factory):
    from rewardtune.api import run_recipe
    from rewardtune.recipe import load_recipe

    root = write_mvtec_layout(tmp_path_factory.mktemp("mvtec") / "mvtec", categories=("bottle", "grid"), size=32)
    out = tmp_path_factory.mktemp("runs") / "dxmi_mvtec"
    run_recipe(load_recipe(REPO / "recipes" / "dxmi_mvtec.toml", [f"data.root={root}", *TINY]), out)
    return root, out


def test_mvtec_recipe_trains_and_reports_aurocs_per_category(mvtec_run):
    _, out = mvtec_run
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    for key in ("image_auroc", "pixel_auroc", "image_auroc/bottle", "pixel_auroc/grid", "sliced_wasserstein"):
        assert 0.0 <= metrics[key] <= (1.0 if "auroc" in key else 10.0), key
    assert (out / "checkpoints" / "best").is_dir()  # keep_best = image_auroc
    assert sorted(p.name for p in out.glob("samples_step*.png"))  # the localisation figure


def test_rewardtune_score_on_the_mvtec_layout(mvtec_run, tmp_path, capsys):
    root, out = mvtec_run
    target = tmp_path / "scores"
    code, _, err = run_cli(capsys, "score", out, root / "bottle" / "test", "--masks", root / "bottle" / "ground_truth",
                            "-o", target)
    assert code == 0, err
    rows = list(csv.DictReader((target / "scores.csv").open()))
    assert len(rows) == 4 and {r["label"] for r in rows} == {"0", "1"}
    aurocs = json.loads((target / "auroc.json").read_text())
    assert 0.0 <= aurocs["image_auroc"] <= 1.0 and 0.0 <= aurocs["pixel_auroc"] <= 1.0
    assert len(list((target / "overlays").glob("*.png"))) == 4
    # the scores are the run's energy: max-pooled maps of the run's extractor and reward
    from rewardtune.anomaly.model import load_anomaly_model
    from rewardtune.anomaly.scoring import read_folder, score_images

    model = load_anomaly_model(out)
    scan = read_folder(root / "bottle" / "test", model.image_channels, image_size=model.image_size)
    scores, _ = score_images(model, scan.images)
    by_path = {r["path"]: float(r["score"]) for r in rows}
    for path, score in zip(scan.paths, scores.tolist()):
        assert math.isclose(by_path[str(path)], score, rel_tol=1e-4, abs_tol=1e-6)


def test_prior_and_data_errors_are_one_line(tmp_path, capsys):
    root = write_mvtec_layout(tmp_path / "mvtec", categories=("bottle",), size=32)
    recipe = (REPO / "recipes" / "dxmi_mvtec.toml").read_text()
    energy = recipe.split("[reward]")[0] + "[reward]\nkind = \"energy\"\nshare_with_value = false\n\n[algorithm]" + \
        recipe.split("[algorithm]")[1]
    (tmp_path / "energy.toml").write_text(energy)
    tiny = [a for item in TINY if not item.startswith("reward.") for a in ("--set", item)]
    cases = [  # (recipe, overrides, what the error names)
        (tmp_path / "energy.toml", [f"data.root={root}"], "autoencoder"),  # the noised-data prior needs the AE energy
        (REPO / "recipes" / "dxmi_mvtec.toml", ["data.root=/no/such/folder"], "/no/such/folder"),
        (REPO / "recipes" / "dxmi_mvtec.toml", [f"data.root={root}", "data.extractor=no_such_net"],
         "unknown feature extractor"),
        (REPO / "recipes" / "dxmi_mvtec.toml", [f"data.root={root}", "eval.repeats=3"], "eval.repeats does not apply"),
        (REPO / "recipes" / "dxmi_mvtec.toml", [f"data.root={root}", "eval.feature_extractor=digits"],
         "eval.feature_extractor does not apply"),
        (REPO / "recipes" / "dxmi_mvtec.toml", [f"data.root={root}", "eval.reference_samples=100"],
         "eval.reference_samples does not apply"),
        (REPO / "recipes" / "dxmi_mvtec.toml", [f"data.root={root}", "data.weights=/no/such/weights.safetensors"],
         "do not exist"),
    ]
    for path, overrides, message in cases:
        args = ["run", str(path), "--out", str(tmp_path / "run"), *tiny]
        for item in overrides:
            args += ["--set", item]
        if path.name == "dxmi_mvtec.toml":
            args += [a for item in TINY if item.startswith("reward.") for a in ("--set", item)]
        code, _, err = run_cli(capsys, *args)
        assert code == 2, (overrides, err)
        errors = [line for line in err.strip().splitlines() if line.startswith("error:")]  # after progress lines
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, (overrides, err)
        assert err.strip().splitlines()[-1] == errors[0]


def test_anomaly_run_resumes_to_the_same_numbers_without_pretraining_again(tmp_path, monkeypatch, restore_threads):
    """Two steps, then two more on --resume, equal four straight: the pretrained autoencoder, the prior's frozen
    copy and its noise scale come back from the checkpoint, so the resumed build skips the pretraining (and so do
    eval and the scorer, which load the run); the run directory keeps the recipe as written."""
    from rewardtune.anomaly.model import load_anomaly_model
    from rewardtune.api import run_recipe
    from rewardtune.recipe import load_recipe
    from rewardtune.rewards import autoencoder

    # Bitwise equality needs one reduction order in every run, the autoencoder's pretraining (before a trainer sets
    # train.cpu_threads) included: one thread throughout (with 2 the runs differed at 1e-6).
    torch.set_num_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    pretrained = []
    real = autoencoder.pretrain_autoencoder
    monkeypatch.setattr(autoencoder, "pretrain_autoencoder", lambda *a, **k: (pretrained.append(k["steps"]), real(*a, **k))[1])
    root = write_mvtec_layout(tmp_path / "mvtec", categories=("bottle",), size=32)
    recipe = REPO / "recipes" / "dxmi_mvtec.toml"
    settings = [f"data.root={root}", *TINY, "train.eval_every=0", "eval.keep_best=", "eval.best_mode=min"]
    straight = run_recipe(load_recipe(recipe, [*settings, "train.steps=4"]), tmp_path / "straight")
    run_recipe(load_recipe(recipe, [*settings, "train.steps=2"]), tmp_path / "resumed")
    assert pretrained == [20, 20]
    resumed = run_recipe(load_recipe(recipe, [*settings, "train.steps=4"]), tmp_path / "resumed", resume=True, force=True)
    assert straight["metrics"] == resumed["metrics"]
    load_anomaly_model(tmp_path / "resumed")
    assert pretrained == [20, 20]  # neither the resume nor loading the run pretrained again
    assert "pretrain_steps = 20" in (tmp_path / "resumed" / "recipe.toml").read_text()
    fresh = run_recipe(load_recipe(recipe, [*settings, "train.steps=2"]), tmp_path / "fresh", resume=True)
    assert pretrained == [20, 20, 20] and fresh["step"] == 2  # --resume with no checkpoint yet builds in full


def test_resume_refuses_a_changed_prior(tmp_path):
    """The prior's weights and noise scale are in the checkpoint: a changed [prior] on --resume is refused in one
    line naming the setting, before anything in the run directory changes."""
    from rewardtune.api import run_recipe
    from rewardtune.recipe import load_recipe

    root = write_mvtec_layout(tmp_path / "mvtec", categories=("bottle",), size=32)
    recipe = REPO / "recipes" / "dxmi_mvtec.toml"
    settings = [f"data.root={root}", *TINY, "train.steps=2", "train.eval_every=0", "eval.keep_best=",
                "eval.best_mode=min"]
    run_recipe(load_recipe(recipe, settings), tmp_path / "run")
    before = (tmp_path / "run" / "recipe.toml").read_text()
    with pytest.raises(RecipeError, match="prior.noise_scale") as err:
        run_recipe(load_recipe(recipe, [*settings, "prior.noise_scale=0.5"]), tmp_path / "run", resume=True, force=True)
    assert "\n" not in str(err.value)
    assert (tmp_path / "run" / "recipe.toml").read_text() == before


def test_feature_extraction_and_pretraining_report_their_progress(tmp_path):
    """The long work a recipe's build does (features of every image, the autoencoder's pretraining) shows up as
    stages on the run's reporter, each started, advanced to its end and stopped."""
    from rewardtune.build import build_experiment
    from rewardtune.recipe import load_recipe

    class Recording:
        def __init__(self):
            self.events = []

        def start(self, total, done, description):
            self.events.append(("start", description, total))

        def advance(self, step, metrics):
            self.events.append(("advance", step))

        def message(self, text):
            self.events.append(("message", text))

        def stop(self):
            self.events.append(("stop",))

    root = write_mvtec_layout(tmp_path / "mvtec", categories=("bottle",), size=32)
    reporter = Recording()
    build_experiment(load_recipe(REPO / "recipes" / "dxmi_mvtec.toml", [f"data.root={root}", *TINY]), reporter=reporter)
    starts = [e for e in reporter.events if e[0] == "start"]
    assert [s[1].split(" (")[0] for s in starts] == [
        "features of the training images", "features of the test images", "autoencoder pretraining"]
    assert [s[2] for s in starts] == [4, 4, 20]  # 4 training and 4 test images, 20 pretraining steps
    stages = " ".join(e[0] for e in reporter.events).split("stop")[:-1]
    assert len(stages) == 3 and all(s.strip().startswith("start") and "advance" in s for s in stages)
