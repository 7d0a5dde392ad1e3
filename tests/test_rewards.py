"""Reward plugins (rewards/clip.py, aesthetic.py, composite.py, base.py and plugins/): tiny open_clip models saved and
loaded through "local-dir:", the aesthetic head, composite sums and running normalisation, the reward contract,
plugin discovery (dotted path, decorator, installed entry point), the example plugins, and DxDP with a
non-differentiable reward.

No network and no downloaded weights: the CLIP models are random 1-layer towers written to a temp folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rewardtune.algorithms.dxdp import DxDP, DxDPConfig
from rewardtune.backbones.mlp import build_mlp_backbone
from rewardtune.build import build_experiment, call_factory
from rewardtune.conditions import Conditions
from rewardtune.errors import PluginError, PluginNotFoundError, RecipeError
from rewardtune.nets.conditioning import Conditioning
from rewardtune.nets.value import build_time_mlp_value
from rewardtune.recipe import parse_recipe, recipe_to_toml
from rewardtune.registry import REWARDS
from rewardtune.rewards.aesthetic import AestheticHead, build_aesthetic_reward
from rewardtune.rewards.base import Reward, check_reward_output
from rewardtune.rewards.clip import build_clip_reward, resize_crop
from rewardtune.rewards.composite import CompositeReward
from rewardtune.rewards.energy import build_energy_reward

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_MEAN, TINY_STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


# ---------------------------------------------------------------------------------------------------------------------
# fixtures and small rewards
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random 1-layer open_clip model saved as open_clip_config.json + open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("tiny_clip")
    (path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": TINY_MEAN, "std": TINY_STD}})
    )
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{path}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


def reference_clip(path: Path):
    """The tiny model loaded straight through open_clip, as the oracle."""
    import open_clip

    model = open_clip.create_model(f"local-dir:{path}").eval()
    return model, open_clip.get_tokenizer(f"local-dir:{path}")


def normalise_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] RGB images already at the model's size -> the tiny model's input."""
    mean, std = torch.tensor(TINY_MEAN).view(1, 3, 1, 1), torch.tensor(TINY_STD).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


class SumReward(Reward):
    """r(x) = sum(x) + offset: exact and differentiable."""

    name = "sum"

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, x, context=None):
        return x.flatten(1).sum(1) + self.offset


class NormReward(Reward):
    """r(x) = -||x||^2, not differentiable by declaration (to test the composite's flags)."""

    differentiable = False

    def forward(self, x, context=None):
        return -x.flatten(1).pow(2).sum(1)


class BadShapeReward(Reward):
    name = "bad_shape"

    def forward(self, x, context=None):
        return x.flatten(1).sum(1, keepdim=True)  # [B, 1]: breaks the contract


class NanReward(Reward):
    name = "nan_reward"

    def forward(self, x, context=None):
        r = x.flatten(1).sum(1)
        return torch.where(torch.arange(x.shape[0]) == 1, torch.full_like(r, math.nan), r)


def build_sum_reward(sample_shape, /, *, offset: float = 0.0) -> SumReward:
    """A dotted-path reward factory ("test_rewards:build_sum_reward")."""
    return SumReward(offset)


def build_bad_shape_reward(sample_shape, /) -> BadShapeReward:
    return BadShapeReward()


def load_plugin(package: str, folder: str):
    """The plugin package: imported if installed, else loaded from plugins/<folder> (no install needed)."""
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError:
        init = PLUGINS / folder / package / "__init__.py"
        spec = importlib.util.spec_from_file_location(package, init)
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
        return module


def images(n: int, shape=(3, 16, 16), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------------
# clip
# ---------------------------------------------------------------------------------------------------------------------
def test_clip_local_dir_matches_open_clip_and_gradient_reaches_pixels(tiny_clip_dir):
    prompts = ("a photo of a cat", "a drawing of a dog")
    reward = build_clip_reward((3, 16, 16), model=f"local-dir:{tiny_clip_dir}", prompts=prompts, scale=2.5)
    x = images(4).requires_grad_(True)
    r = reward(x)
    assert r.shape == (4,) and reward.differentiable and not reward.learns

    model, tokenizer = reference_clip(tiny_clip_dir)
    with torch.no_grad():
        image = F.normalize(model.encode_image(normalise_pixels(x)), dim=-1)  # [4, 16]
        text = F.normalize(model.encode_text(tokenizer(list(prompts))), dim=-1)  # [2, 16]
    expected = 2.5 * (image @ text.T).mean(1)
    torch.testing.assert_close(r.detach(), expected, rtol=1e-5, atol=1e-6)  # float32, same ops in the same order

    r.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_clip_grey_small_images_are_resized_and_context_picks_prompts(tiny_clip_dir):
    prompts = ("a cat", "a dog")
    reward = build_clip_reward((1, 8, 8), model=f"local-dir:{tiny_clip_dir}", prompts=prompts)
    x = images(3, (1, 8, 8)).requires_grad_(True)
    r = reward(x)
    r.sum().backward()
    assert r.shape == (3,) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    with torch.no_grad():
        per_prompt = torch.stack([reward(x, torch.full((3,), i)) for i in range(2)])  # [2, 3]
        torch.testing.assert_close(per_prompt.mean(0), reward(x), rtol=1e-6, atol=1e-6)  # float32 mean of two
        torch.testing.assert_close(reward(x, ["a dog", "a cat", "a dog"]), per_prompt[[1, 0, 1], [0, 1, 2]], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="context must be"):
        reward(x, torch.zeros(2, dtype=torch.long))


def test_resize_crop_matches_torchvision():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = images(2, (3, 10, 14))
    got = resize_crop(x, (16, 16), mode="shortest", interpolation="bicubic", fill=0.0)
    expected = TF.center_crop(TF.resize(x, 16, interpolation=InterpolationMode.BICUBIC, antialias=True), [16, 16])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # float32; both are torch's antialiased bicubic
    down = resize_crop(x, (6, 6), mode="squash", interpolation="bilinear", fill=0.0)
    expected = TF.resize(x, [6, 6], interpolation=InterpolationMode.BILINEAR, antialias=True)
    torch.testing.assert_close(down, expected, rtol=1e-5, atol=1e-5)  # float32, same kernel
    padded = resize_crop(x, (16, 16), mode="longest", interpolation="bicubic", fill=0.5)
    assert padded.shape == (2, 3, 16, 16)
    assert (padded[..., :2, :] == 0.5).all()  # 10x14 -> 11x16, padded at the top and bottom
    same = resize_crop(x, (10, 14), mode="shortest", interpolation="bicubic", fill=0.0)
    torch.testing.assert_close(same, x, rtol=0, atol=0)  # same size: no resampling at all


def test_clip_failures_are_one_line_plugin_errors(tiny_clip_dir, tmp_path):
    with pytest.raises(PluginError, match="local-dir:") as err:
        build_clip_reward((3, 16, 16), model=f"local-dir:{tmp_path / 'missing'}")
    assert "\n" not in str(err.value)
    # a folder with a config but no weights: a random CLIP is refused, not silently used
    (tmp_path / "open_clip_config.json").write_text((tiny_clip_dir / "open_clip_config.json").read_text())
    with pytest.raises(PluginError, match="cannot load open_clip model"):
        build_clip_reward((3, 16, 16), model=f"local-dir:{tmp_path}")
    with pytest.raises(ValueError, match="needs images"):
        build_clip_reward((2,), model=f"local-dir:{tiny_clip_dir}")


@pytest.mark.skipif(
    __import__("os").environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 (set by conftest)"
)
def test_clip_pretrained_tag_offline_is_a_plugin_error(tmp_path):
    with pytest.raises(PluginError, match="ViT-B-32 .pretrained 'openai'.*local-dir:") as err:
        build_clip_reward((3, 32, 32), model="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))  # empty cache
    assert "\n" not in str(err.value)


def test_openai_tags_get_quick_gelu(monkeypatch):
    """open_clip only warns when OpenAI weights (trained with QuickGELU) meet a GELU model; the reward asks for it."""
    import open_clip

    seen = {}

    def fake_create_model(name, **kwargs):
        seen.update(kwargs, name=name)
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(PluginError, match="stop here"):
        build_clip_reward((3, 32, 32), model="ViT-B-32", pretrained="openai")
    assert seen["force_quick_gelu"] is True and seen["pretrained"] == "openai" and seen["require_pretrained"]
    with pytest.raises(PluginError):
        build_clip_reward((3, 32, 32), model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert seen["force_quick_gelu"] is False


def test_frozen_networks_stay_out_of_checkpoints(tiny_clip_dir):
    reward = build_clip_reward((3, 16, 16), model=f"local-dir:{tiny_clip_dir}", prompts=("a cat",))
    assert reward.state_dict() == {}
    reward.load_state_dict({}, strict=True)  # resume: the frozen network is rebuilt by the factory
    composite = CompositeReward({"clip": (reward, 1.0), "sum": (SumReward(), 1.0)}, normalize=True)
    assert set(composite.state_dict()) == {"running_mean", "running_var", "num_updates"}
    composite.load_state_dict(composite.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# aesthetic
# ---------------------------------------------------------------------------------------------------------------------
def test_aesthetic_head_has_the_published_layout():
    shapes = {k: tuple(v.shape) for k, v in AestheticHead(768).state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,), "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }  # keys of sac+logos+ava1-l14-linearMSE.pth (nn.Sequential with dropouts at 1, 3, 5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_with_tiny_clip_and_random_head(tiny_clip_dir, tmp_path, suffix):
    torch.manual_seed(1)
    head = AestheticHead(16).eval()
    path = tmp_path / f"head{suffix}"
    if suffix == ".pth":
        torch.save(head.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(head.state_dict(), str(path))
    reward = build_aesthetic_reward((3, 16, 16), head=str(path), model=f"local-dir:{tiny_clip_dir}")
    x = images(4).requires_grad_(True)
    r = reward(x)
    model, _ = reference_clip(tiny_clip_dir)
    with torch.no_grad():
        expected = head(F.normalize(model.encode_image(normalise_pixels(x)), dim=-1)).view(-1)
    torch.testing.assert_close(r.detach(), expected, rtol=1e-5, atol=1e-6)  # float32, same ops
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert reward.state_dict() == {}


def test_aesthetic_head_errors(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("REWARDTUNE_CACHE", str(tmp_path / "cache"))
    model = f"local-dir:{tiny_clip_dir}"
    with pytest.raises(PluginError, match="do not exist"):
        build_aesthetic_reward((3, 16, 16), head=str(tmp_path / "nope.pth"), model=model)
    torch.save(AestheticHead(768).state_dict(), tmp_path / "l14.pth")  # a ViT-L/14 head on a 16-d CLIP
    with pytest.raises(PluginError, match="do not fit the MLP on 16-d"):
        build_aesthetic_reward((3, 16, 16), head=str(tmp_path / "l14.pth"), model=model)
    with pytest.raises(PluginError, match="cannot download the head weights.*head = ") as err:
        build_aesthetic_reward((3, 16, 16), head="http://127.0.0.1:9/head.pth", model=model)  # nothing listens there
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# composite
# ---------------------------------------------------------------------------------------------------------------------
def test_composite_weighted_sum_flags_and_logged_terms():
    x = images(5, (2, 3))
    composite = CompositeReward({"sum": (SumReward(1.0), 2.0), "norm": (NormReward(), -0.5)})
    expected = 2.0 * (x.flatten(1).sum(1) + 1.0) - 0.5 * -x.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(composite(x), expected, rtol=1e-6, atol=1e-6)  # float32, two terms
    assert set(composite.last_terms) == {"reward/sum", "reward/norm"}
    assert composite.last_terms["reward/sum"] == pytest.approx(float(x.flatten(1).sum(1).mean() + 1.0), rel=1e-6)
    assert not composite.differentiable and not composite.learns  # one term is not differentiable
    assert CompositeReward({"sum": (SumReward(), 1.0)}).differentiable
    with pytest.raises(ValueError, match="snake_case"):
        CompositeReward({"Bad Name": (SumReward(), 1.0)})


def test_composite_running_normalisation_matches_pooled_statistics():
    """With momentum 1/2 and equal batches, the running mean/variance are those of the two batches pooled."""
    composite = CompositeReward({"sum": (SumReward(), 1.0), "norm": (NormReward(), 3.0)}, normalize=True, momentum=0.5)
    a, b = images(6, (4,), seed=1), images(6, (4,), seed=2)
    terms_a = torch.stack([a.sum(1), -a.pow(2).sum(1)]).double()  # [2, 6]
    terms_b = torch.stack([b.sum(1), -b.pow(2).sum(1)]).double()
    out = composite(a)  # first batch: standardised by its own statistics
    z = (terms_a - terms_a.mean(1, keepdim=True)) / (terms_a.var(1, unbiased=False, keepdim=True) + 1e-8).sqrt()
    torch.testing.assert_close(out.double(), z[0] + 3 * z[1], rtol=1e-5, atol=1e-5)  # float32 rewards
    composite(b)
    pooled = torch.cat([terms_a, terms_b], 1)
    torch.testing.assert_close(composite.running_mean, pooled.mean(1), rtol=1e-6, atol=1e-6)  # float32 inputs
    torch.testing.assert_close(composite.running_var, pooled.var(1, unbiased=False), rtol=1e-5, atol=1e-6)
    assert int(composite.num_updates) == 2

    with torch.no_grad():  # evaluation leaves the statistics alone
        composite(a)
    composite.eval()
    composite(a)
    assert int(composite.num_updates) == 2

    restored = CompositeReward({"sum": (SumReward(), 1.0), "norm": (NormReward(), 3.0)}, normalize=True, momentum=0.5)
    restored.load_state_dict(composite.state_dict(), strict=True)
    restored.eval()
    torch.testing.assert_close(restored(b), composite(b), rtol=0, atol=0)  # same buffers, same computation


def test_composite_forwards_learning_updates():
    energy = build_energy_reward((2,), None, 3, share_with_value=False, hidden=16, depth=2)
    composite = CompositeReward({"energy": (energy, 1.0), "sum": (SumReward(), 0.1)})
    assert composite.learns and composite.differentiable
    composite(images(8, (2,), seed=3))  # the last batch scored: its term means are logged with the update
    metrics = composite.update(images(8, (2,), seed=1), images(8, (2,), seed=2))
    assert {"energy/loss", "energy/real", "energy/fake", "reward/energy", "reward/sum"} <= set(metrics)
    assert composite.optimizers() == [energy.optimizer]


def test_composite_recipe_terms_are_validated_and_resolved():
    raw = {
        "data": {"kind": "8gaussians"},
        "backbone": {"kind": "mlp"},
        "algorithm": {"kind": "dxdp"},
        "value": {"kind": "time_mlp", "hidden": 16, "depth": 2, "time_dim": 8},
        "reward": {
            "kind": "composite",
            "normalize": True,
            "terms": [
                {"kind": "test_rewards:build_sum_reward", "weight": 2, "offset": 1},
                {"kind": "energy", "name": "ebm", "share_with_value": False, "hidden": 16, "depth": 2},
            ],
        },
    }
    recipe = parse_recipe(raw)
    terms = recipe.resolved["reward"]["terms"]
    assert terms[0] == {"kind": "test_rewards:build_sum_reward", "weight": 2.0, "offset": 1.0}
    assert terms[1]["weight"] == 1.0 and terms[1]["name"] == "ebm" and terms[1]["gamma"] == 1.0
    import tomllib

    assert parse_recipe(tomllib.loads(recipe_to_toml(recipe))).resolved == recipe.resolved  # the resolved form re-parses

    value = build_time_mlp_value((2,), hidden=16, depth=2, time_dim=8)
    context = {"sample_shape": (2,), "num_steps": 3, "backbone": None, "value": value, "reward": None, "conditioning": None}
    composite = call_factory("reward", recipe.plugins["reward"], context)
    assert list(composite.terms) == ["build_sum_reward", "ebm"] and composite.learns and composite.normalize

    def bad(term: dict) -> dict:
        return {**raw, "reward": {"kind": "composite", "terms": [term]}}

    with pytest.raises(RecipeError, match=r"\[reward\] terms\[0\] unknown key 'ofset' .*did you mean 'offset'"):
        parse_recipe(bad({"kind": "test_rewards:build_sum_reward", "ofset": 1.0}))
    with pytest.raises(RecipeError, match=r"terms\[0\] weight: expected a number"):
        parse_recipe(bad({"kind": "test_rewards:build_sum_reward", "weight": "high"}))
    with pytest.raises(RecipeError, match=r"terms\[0\] needs a 'kind'"):
        parse_recipe(bad({"weight": 1.0}))
    with pytest.raises(RecipeError, match="expected a reward table"):
        parse_recipe(bad("jpeg"))
    with pytest.raises(RecipeError, match="term 'energy' shares the value network; set share_with_value = false"):
        call_factory("reward", parse_recipe(bad({"kind": "energy"})).plugins["reward"], context)


# ---------------------------------------------------------------------------------------------------------------------
# the contract and discovery
# ---------------------------------------------------------------------------------------------------------------------
def test_contract_errors_name_the_plugin():
    x = images(4, (2,))
    with pytest.raises(PluginError, match=r"reward 'bad_shape' returned shape \(4, 1\) for a batch of 4; expected \(4,\)"):
        check_reward_output("bad_shape", BadShapeReward()(x), 4)
    with pytest.raises(PluginError, match=r"reward 'nan_reward' returned NaN/inf for 1 of 4 samples"):
        check_reward_output("nan_reward", NanReward()(x), 4)
    with pytest.raises(PluginError, match="returned a list"):
        check_reward_output("listy", [1.0, 2.0], 2)
    with pytest.raises(PluginError, match="floating-point"):
        check_reward_output("ints", torch.ones(4, dtype=torch.long), 4)
    with pytest.raises(PluginError, match="reward 'nan_reward' returned NaN"):  # a term of a composite is named
        CompositeReward({"nan_reward": (NanReward(), 1.0), "sum": (SumReward(), 1.0)})(x)


def tiny_dxdp(reward: Reward, sample_shape=(2,), **config) -> DxDP:
    backbone = build_mlp_backbone(sample_shape, num_steps=3, hidden=32, depth=2, time_dim=16)
    value = build_time_mlp_value(sample_shape, hidden=32, depth=2, time_dim=16, lr=1e-3)
    return DxDP(backbone, reward, value, config=DxDPConfig(**config))


def test_dxdp_refuses_a_reward_breaking_the_contract():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    bad_shape = REWARDS.get("test_rewards:build_bad_shape_reward")((2,))  # found by dotted path
    for reward, message in [(bad_shape, "reward 'bad_shape' returned shape"), (NanReward(), "reward 'nan_reward' returned NaN")]:
        algorithm = tiny_dxdp(reward)
        trajectory = algorithm.backbone.sample(4, gen)
        with pytest.raises(PluginError, match=message):
            algorithm.update(None, trajectory, gen)


def test_discovery_by_dotted_path_and_decorator():
    assert REWARDS.get("test_rewards:build_sum_reward") is build_sum_reward
    raw = {"data": {"kind": "8gaussians"}, "backbone": {"kind": "mlp"}, "algorithm": {"kind": "dxdp"}}
    recipe = parse_recipe({**raw, "reward": {"kind": "test_rewards:build_sum_reward", "offset": 2.0}})
    assert recipe.plugins["reward"].options == {"offset": 2.0}
    with pytest.raises(RecipeError, match="unknown key 'offest' for kind 'test_rewards:build_sum_reward' .*'offset'"):
        parse_recipe({**raw, "reward": {"kind": "test_rewards:build_sum_reward", "offest": 2.0}})
    with pytest.raises(PluginNotFoundError, match="has no attribute 'build_nothing'"):
        REWARDS.get("test_rewards:build_nothing")

    name = "test_rewards_decorated"
    try:
        REWARDS.register(name)(build_sum_reward)
        assert parse_recipe({**raw, "reward": {"kind": name}}).plugins["reward"].options == {"offset": 0.0}
    finally:
        REWARDS._registered.pop(name, None)  # leave the global registry as it was


def test_builtin_rewards_are_registered():
    for name in ("energy", "clip", "aesthetic", "composite"):
        assert REWARDS.source(name) == "built-in"
        REWARDS.get(name)  # imports lazily without error


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.mark.skipif(not installed("rewardtune_jpeg"), reason="rewardtune-jpeg is not installed (.ci/run installs plugins/)")
def test_jpeg_discovered_through_its_entry_point():
    import rewardtune_jpeg

    assert REWARDS.source("jpeg") == "entry point rewardtune_jpeg:build_jpeg_reward"
    assert REWARDS.get("jpeg") is rewardtune_jpeg.build_jpeg_reward
    raw = {"data": {"kind": "digits"}, "backbone": {"kind": "mlp"}, "algorithm": {"kind": "dxdp"}}
    recipe = parse_recipe({**raw, "reward": {"kind": "jpeg", "quality": 50}})
    assert recipe.resolved["reward"] == {"kind": "jpeg", "quality": 50, "upscale": 1, "scale": 1.0}
    with pytest.raises(RecipeError, match="unknown key 'qualty' for kind 'jpeg' .*did you mean 'quality'"):
        parse_recipe({**raw, "reward": {"kind": "jpeg", "qualty": 50}})


@pytest.mark.skipif(
    not installed("rewardtune_digits_classifier"),
    reason="rewardtune-digits-classifier is not installed (.ci/run installs plugins/)",
)
def test_digits_classifier_discovered_through_its_entry_point():
    import rewardtune_digits_classifier

    assert REWARDS.get("digits_classifier") is rewardtune_digits_classifier.build_digits_classifier_reward
    raw = {"data": {"kind": "digits"}, "backbone": {"kind": "mlp"}, "value": {"kind": "time_mlp"},
           "algorithm": {"kind": "dxdp"}}
    recipe = parse_recipe({**raw, "reward": {"kind": "digits_classifier"}})  # target_class is optional at parse time
    with pytest.raises(RecipeError, match="kind 'digits_classifier': needs target_class"):  # not for an unconditional run
        build_experiment(recipe)


# ---------------------------------------------------------------------------------------------------------------------
# the example plugins
# ---------------------------------------------------------------------------------------------------------------------
def test_jpeg_reward_prefers_flat_images():
    jpeg = load_plugin("rewardtune_jpeg", "rewardtune-jpeg")
    reward = jpeg.build_jpeg_reward((3, 16, 16), quality=95)
    flat = torch.zeros(2, 3, 16, 16)
    noisy = images(2, (3, 16, 16))
    r = reward(torch.cat([flat, noisy]))
    assert r.shape == (4,) and r.dtype == torch.float32 and (r < 0).all()
    assert r[:2].min() > r[2:].max()  # noise compresses worse
    grey = reward(torch.cat([torch.zeros(1, 1, 16, 16), images(1, (1, 16, 16))]))
    assert grey[0] > grey[1]
    assert not reward.differentiable and not reward.learns
    with pytest.raises(ValueError, match="needs images"):
        jpeg.build_jpeg_reward((2,))


def test_jpeg_upscale_makes_the_size_of_8x8_digits_depend_on_their_content():
    """An 8 x 8 image is one JPEG block: its size is nearly all header. Enlarged 4 x by pixel repetition, the size of
    real digits spreads over a range several times wider, and a blank image stays far below any digit."""
    from rewardtune.data.images import load_digits_images

    jpeg = load_plugin("rewardtune_jpeg", "rewardtune-jpeg")
    digits = load_digits_images()[:200]
    small = jpeg.build_jpeg_reward((1, 8, 8), quality=95).sizes_kb(digits)
    large = jpeg.build_jpeg_reward((1, 8, 8), quality=95, upscale=4).sizes_kb(digits)
    assert large.std() > 5 * small.std()
    blank = jpeg.build_jpeg_reward((1, 8, 8), quality=95, upscale=4).sizes_kb(-torch.ones(1, 1, 8, 8))
    assert blank.item() < large.min().item()
    scaled = jpeg.build_jpeg_reward((1, 8, 8), quality=95, upscale=4, scale=10.0)
    assert torch.allclose(scaled(digits[:4]), -10 * large[:4])
    assert scaled.evaluation_metrics(digits) == {"jpeg_kb": pytest.approx(float(large.mean()))}
    with pytest.raises(ValueError, match="upscale"):
        jpeg.build_jpeg_reward((1, 8, 8), upscale=0)


def test_digits_classifier_reward_scores_the_target_class():
    from rewardtune.data.images import load_digits_images

    plugin = load_plugin("rewardtune_digits_classifier", "rewardtune-digits-classifier")
    from sklearn.datasets import load_digits

    labels = torch.from_numpy(load_digits().target)
    threes = load_digits_images()[1500:][labels[1500:] == 3][:8].clone().requires_grad_(True)  # held-out digits
    reward3 = plugin.build_digits_classifier_reward((1, 8, 8), target_class=3)
    reward5 = plugin.build_digits_classifier_reward((1, 8, 8), target_class=5)
    r3 = reward3(threes)
    assert r3.shape == (8,) and (r3 <= 0).all()
    assert r3.mean() > reward5(threes).mean()
    r3.sum().backward()
    assert torch.isfinite(threes.grad).all() and threes.grad.abs().sum() > 0
    assert reward3.state_dict() == {}  # the classifier is rebuilt from its cache, not checkpointed
    with pytest.raises(ValueError, match="0..9"):
        plugin.build_digits_classifier_reward((1, 8, 8), target_class=10)


# ---------------------------------------------------------------------------------------------------------------------
# DxDP with a non-differentiable reward
# ---------------------------------------------------------------------------------------------------------------------
def test_dxdp_trains_with_a_non_differentiable_reward():
    """With terminal = "value", V(x_T, T) regresses on -r(x_T) and the policy step differentiates only V."""
    jpeg = load_plugin("rewardtune_jpeg", "rewardtune-jpeg").build_jpeg_reward((1, 8, 8), quality=75)
    reward = CompositeReward({"jpeg": (jpeg, 1.0), "sum": (SumReward(), 0.01)}, normalize=True)
    assert not reward.differentiable and not reward.learns
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    algorithm = tiny_dxdp(reward, (1, 8, 8), sampler_lr=1e-3)
    before = [p.detach().clone() for p in algorithm.backbone.network_parameters()]
    for _ in range(3):
        trajectory = algorithm.backbone.sample(8, gen)
        metrics = algorithm.update(None, trajectory, gen)
        assert math.isfinite(metrics["value/terminal_loss"]) and math.isfinite(metrics["policy/loss"])
    after = algorithm.backbone.network_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert int(reward.num_updates) == 3  # one terminal cost per iteration
    with pytest.raises(ValueError, match="needs a differentiable reward"):
        tiny_dxdp(jpeg, (1, 8, 8), terminal="reward")


def test_a_separate_resnet_energy_trains_on_images_and_refuses_the_mlp_options():
    torch.manual_seed(0)
    energy = build_energy_reward((3, 8, 8), None, 3, share_with_value=False, network="resnet", channels=8, lr=1e-3)
    real, fake = images(16, (3, 8, 8), seed=1), images(16, (3, 8, 8), seed=2) * 0.2
    assert energy(real).shape == (16,)
    for _ in range(30):
        energy.update(real, fake)
    assert float(energy(real).detach().mean()) > float(energy(fake).detach().mean())  # reward = -E: the data scores higher
    conditional = build_energy_reward((3, 8, 8), None, 3, Conditioning(num_classes=4), share_with_value=False,
                                      network="resnet", channels=8)
    assert conditional(real[:4], Conditions.from_labels([0, 1, 2, 3])).shape == (4,)
    for options, message in [
        ({"network": "resnet", "hidden": 16}, "options of network = \"mlp\""),
        ({"network": "mlp", "channels": 8}, "option of network = \"resnet\""),
        ({"network": "vit"}, "unknown energy network 'vit'"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_energy_reward((3, 8, 8), None, 3, share_with_value=False, **options)
    with pytest.raises(ValueError, match="needs images"):
        build_energy_reward((2,), None, 3, share_with_value=False, network="resnet")
    with pytest.raises(ValueError, match="network belongs to the \\[value\\] section"):
        build_energy_reward((3, 8, 8), build_time_mlp_value((3, 8, 8), hidden=8, depth=1), 3, network="resnet")


class UnitRangeBrightness(Reward):
    """Mean pixel of images it takes in [0, 1] (as most reward models' own code does); records its inputs."""

    name = "unit_brightness"
    image_range = (0.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        self.seen.append(x.detach())
        return x.flatten(1).mean(1)

    def evaluation_metrics(self, x: torch.Tensor) -> dict[str, float]:
        self.seen.append(x.detach())
        return {"bright_fraction": float((x > 0.5).float().mean())}


def test_a_reward_gets_images_in_the_range_it_declares():
    from rewardtune.conditional_evaluation import reward_evaluation_metrics
    from rewardtune.rewards.base import call_reward

    reward = UnitRangeBrightness()
    x = torch.rand(4, 3, 8, 8) * 2 - 1  # samples: [-1, 1]
    x.requires_grad_(True)
    torch.testing.assert_close(-reward.cost(x), ((x + 1) / 2).flatten(1).mean(1))
    (grad,) = torch.autograd.grad(reward.cost(x).sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, -0.5 / (3 * 8 * 8)))  # d/dx of the mapped mean
    reward_evaluation_metrics(reward, x.detach(), None)
    assert all(float(seen.min()) >= 0 and float(seen.max()) <= 1 for seen in reward.seen)
    vectors = torch.randn(5, 2) * 3  # vectors are not images: unchanged
    torch.testing.assert_close(call_reward(reward, vectors), vectors.mean(1))
    composite = CompositeReward({"unit": (UnitRangeBrightness(), 1.0), "sum": (SumReward(), 1.0)})
    torch.testing.assert_close(composite(x.detach()), ((x.detach() + 1) / 2).flatten(1).mean(1) + SumReward()(x.detach()))
    with pytest.raises(TypeError, match="image_range must be \\(low, high\\) with low < high"):
        type("Backwards", (Reward,), {"image_range": (1.0, 0.0)})
