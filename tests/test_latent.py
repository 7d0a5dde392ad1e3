"""The latent text-to-image backbone `sd` (backbones/latent.py) on a tiny random Stable-Diffusion-layout pipeline
written with save_pretrained: loading, the schedule of its scheduler config, log-probs, prompts through
cross-attention, CFG with the empty prompt, the decoded output, LoRA-only checkpoints with exact resume, and a recipe
end to end through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import cli
from test_resume import StopAt
from test_rewards import tiny_clip_dir  # noqa: F401  (fixture: a tiny open_clip model folder)
from tiny_models import SD_IMAGE_SIZE, write_tiny_sd_pipeline
from torch.distributions import Normal

import rewardtune as rt
from rewardtune.backbones.latent import LatentEpsilonPolicy, build_sd_backbone
from rewardtune.backbones.schedules import ddpm_alphas_cumprod
from rewardtune.conditions import Conditions
from rewardtune.errors import Interrupted, PluginError, RecipeError
from rewardtune.nets.conditioning import Conditioning

pytest.importorskip("transformers")
pytest.importorskip("peft")

TEXT = Conditioning(text_dim=8)
IMAGE = (3, SD_IMAGE_SIZE, SD_IMAGE_SIZE)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny") / "sd")


def prompts(*texts: str) -> Conditions:
    return Conditions(prompts=tuple(texts), embeddings=torch.zeros(len(texts), 8))


def backbone(sd_dir: Path, **options) -> LatentEpsilonPolicy:
    torch.manual_seed(0)
    options = {"num_steps": 3, **options}
    return build_sd_backbone(IMAGE, options.pop("conditioning", TEXT), pretrained=str(sd_dir), **options)


def test_the_pipeline_loads_with_its_schedule_and_latent_shape(sd_dir):
    from diffusers import DDPMScheduler

    policy = backbone(sd_dir)
    assert policy.sample_shape == (4, SD_IMAGE_SIZE // 2, SD_IMAGE_SIZE // 2)
    assert policy.prediction == "epsilon" and policy.cfg_scale == 5.0  # DDPO's default guidance with prompts
    reference = DDPMScheduler.from_pretrained(sd_dir, subfolder="scheduler").alphas_cumprod  # scaled_linear betas
    torch.testing.assert_close(policy.alphas_cumprod, reference.float())
    torch.testing.assert_close(ddpm_alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear").float(), reference.float())
    assert build_sd_backbone(IMAGE, None, pretrained=str(sd_dir)).cfg_scale == 1.0  # no prompts: no guidance
    v = build_sd_backbone(IMAGE, TEXT, pretrained=str(sd_dir), prediction="v_prediction")
    assert v.prediction == "v_prediction"


def test_v_prediction_gives_the_noise_back():
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 and x = sqrt(ab) x0 + sqrt(1 - ab) eps give eps = sqrt(ab) v + sqrt(1 - ab) x."""
    from rewardtune.backbones.epsilon import EpsilonChainPolicy

    policy = EpsilonChainPolicy(torch.nn.Identity(), (3,), num_steps=2, prediction="v_prediction")
    x0, eps = torch.randn(5, 3), torch.randn(5, 3)
    k = torch.tensor([10, 200, 500, 800, 999])
    ab = policy.alphas_cumprod[k].view(-1, 1)
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    torch.testing.assert_close(policy.eps_from_output(v, x, k.float(), None), eps, rtol=1e-4, atol=1e-4)


def test_the_prompt_reaches_the_unet_and_the_log_probs_are_gaussian(sd_dir):
    policy = backbone(sd_dir)
    z, z_next = torch.randn(4, *policy.sample_shape), torch.randn(4, *policy.sample_shape)
    t = torch.tensor([0, 1, 2, 1])
    c = prompts("a red cat", "a cat", "red", "a red cat")
    mean = policy.mean_at(z, t, c)
    expected = Normal(mean, policy.sigma()[t].view(-1, 1, 1, 1)).log_prob(z_next).flatten(1).sum(1)
    torch.testing.assert_close(policy.log_prob(z_next, z, t, c), expected, rtol=1e-5, atol=1e-4)
    other = policy.mean_at(z, t, prompts("a cat", "a red cat", "a cat", "cat"))
    assert all(not torch.allclose(mean[i], other[i]) for i in range(4))  # the prompt changes the mean
    trajectory = policy.sample(4, torch.Generator().manual_seed(1), condition=c)
    for step in range(3):
        recomputed = policy.log_prob(trajectory.states[step + 1], trajectory.states[step], torch.full((4,), step), c)
        torch.testing.assert_close(recomputed, trajectory.log_probs[step], rtol=3e-3, atol=1e-2)
    with pytest.raises(ValueError, match="conditioned on prompts"):
        policy.mean_at(z, t, Conditions.from_labels([0, 1, 2, 3]))


def test_cfg_uses_the_empty_prompt_as_the_unconditional_branch(sd_dir):
    policy = backbone(sd_dir, cfg_scale=3.0)
    z, k, c = torch.randn(2, *policy.sample_shape), torch.tensor([500.0, 900.0]), prompts("a red cat", "a cat")
    states = policy.prompt_states(["a red cat", "a cat"])
    empty = policy.prompt_states(["", ""])
    eps_c = policy.eps_net(z, k, encoder_hidden_states=states).sample
    eps_u = policy.eps_net(z, k, encoder_hidden_states=empty).sample
    torch.testing.assert_close(policy.predict_eps(z, k, condition=c), eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(policy.predict_eps(z, k, condition=c, cfg_scale=1.0), eps_c)
    assert len(policy.prompt_states.cache) == 3  # each prompt encoded once


def test_the_sample_is_the_decoded_image_and_the_checkpointed_decode_has_the_same_gradient(sd_dir):
    policy = backbone(sd_dir)
    z = torch.randn(2, *policy.sample_shape, requires_grad=True)
    image = policy.output(z)
    assert image.shape == (2, *IMAGE) and float(image.detach().abs().max()) <= 1.0
    torch.testing.assert_close(image, policy.decode(z).clamp(-1, 1))
    (grad_checkpointed,) = torch.autograd.grad(image.square().sum(), z)
    policy.decode_checkpointing = False
    (grad_plain,) = torch.autograd.grad(policy.output(z).square().sum(), z)
    torch.testing.assert_close(grad_checkpointed, grad_plain)


def test_lora_trains_only_the_adapters_and_checkpoints_only_them(sd_dir):
    plain, adapted = backbone(sd_dir, lora_rank=2), backbone(sd_dir)
    z, t, c = torch.randn(2, *plain.sample_shape), torch.tensor([0, 2]), prompts("a cat", "red")
    torch.testing.assert_close(plain.mean_at(z, t, c), adapted.mean_at(z, t, c))  # LoRA's B starts at zero
    trainable = [n for n, p in plain.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n == "log_sigma" for n in trainable)
    assert plain.network_parameters() and all(p.requires_grad for p in plain.network_parameters())
    state = plain.state_dict()
    assert not any(k.startswith(("vae.", "prompt_states.")) for k in state)
    unet_keys = [k for k in state if k.startswith("eps_net.")]
    assert unet_keys and all("lora_" in k for k in unet_keys)
    assert set(plain.network_state()) == set(unet_keys)
    # a trained adapter survives a save and a strict load into a freshly built backbone
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    moved = plain.mean_at(z, t, c)
    assert not torch.allclose(moved, adapted.mean_at(z, t, c))
    fresh = backbone(sd_dir, lora_rank=2)
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh.mean_at(z, t, c), moved)
    full = backbone(sd_dir)
    assert any(k.startswith("eps_net.conv_in") for k in full.state_dict())  # full fine-tuning keeps the UNet


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"conditioning": Conditioning(num_classes=3)}, "conditioned on prompts"),
        ({"lora_rank": -1}, "lora_rank must be >= 0"),
        ({"lora_alpha": 4.0}, "need lora_rank > 0"),
        ({"lora_rank": 2, "lora_targets": ["no_such_module"]}, "lora_targets"),
        ({"prediction": "sample", "num_steps": 2}, None),
    ],
)
def test_bad_sd_options_are_refused(sd_dir, options, message):
    if message is None:
        assert backbone(sd_dir, **options).prediction == "sample"
        return
    with pytest.raises(ValueError, match=message):
        backbone(sd_dir, **options)


def test_a_missing_model_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PluginError, match="cannot load the unet from .*point backbone.pretrained") as info:
        build_sd_backbone(IMAGE, TEXT, pretrained=str(tmp_path / "nowhere"))
    assert "\n" not in str(info.value)


def sd_recipe(sd_dir: Path, path: Path) -> Path:
    """DxDP with LoRA on the tiny pipeline: the shapes data and prompts, the verifier's partial reward learnt by a
    conditional value on the latents."""
    repo = Path(__file__).resolve().parent.parent
    path.write_text(f"""
[data]
kind = "shapes"
size = {SD_IMAGE_SIZE}
num_images = 64

[conditions]
kind = "jsonl"
path = "{repo / 'recipes/prompts/shapes/train.jsonl'}"
text_encoder = {{ kind = "hash", dim = 8 }}

[backbone]
kind = "sd"
pretrained = "{sd_dir}"
num_steps = 2
cfg_scale = 2.0
lora_rank = 2

[value]
kind = "time_mlp"
hidden = 16
depth = 1
time_dim = 8

[reward]
kind = "shapes"
partial = true

[algorithm]
kind = "dxdp"
sampler_lr = 1e-3

[train]
steps = 4
batch_size = 4
log_every = 1
checkpoint_every = 2

[eval]
num_samples = 8
feature_extractor = "helpers:tiny_features"
""")
    return path


def test_an_sd_recipe_runs_resumes_exactly_and_samples_through_the_cli(sd_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = sd_recipe(sd_dir, tmp_path / "sd.toml")
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "whole"))
    assert code == 0, err
    loaded = rt.load_recipe(recipe)
    with pytest.raises(Interrupted):  # SIGTERM during step 3, after the checkpoint of step 2
        rt.run_recipe(loaded, tmp_path / "split", reporter=StopAt(3))
    rt.run_recipe(loaded, tmp_path / "split", resume=True)
    whole = load_file(tmp_path / "whole/checkpoints/step_00000004/model.safetensors")
    split = load_file(tmp_path / "split/checkpoints/step_00000004/model.safetensors")
    assert set(whole) == set(split)
    for key in whole:
        torch.testing.assert_close(whole[key], split[key], rtol=0, atol=0, msg=key)
    unet_keys = [k for k in whole if k.startswith("backbone.eps_net.")]
    assert unet_keys and all("lora_" in k for k in unet_keys)  # the checkpoint holds the adapters, not the UNet
    assert not any(".vae." in k or "prompt_states" in k for k in whole)
    code, _, err = cli(capsys, "sample", str(tmp_path / "whole"), "--prompt", "a red circle", "-n", "4",
                         "-o", str(tmp_path / "grid.png"))
    assert code == 0, err
    assert (tmp_path / "grid.png").exists()
    metrics = json.loads((tmp_path / "whole/eval.json").read_text())["metrics"]
    assert {"accuracy", "frechet_distance", "reward_mean"} <= set(metrics)


def test_an_energy_shared_with_the_value_is_refused_on_latents(sd_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = sd_recipe(sd_dir, tmp_path / "sd.toml").read_text()
    text = text.replace('kind = "shapes"\npartial = true', 'kind = "energy"\nshare_with_value = true')
    (tmp_path / "energy.toml").write_text(text)
    with pytest.raises(RecipeError, match=r"share_with_value = true: the value sees the backbone's states \(4, 8, 8\)"):
        rt.build_trainer(rt.load_recipe(tmp_path / "energy.toml"))


def test_the_latent_memory_benchmark_runs_on_the_tiny_config():
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_latent.py"
    command = [sys.executable, str(script), "--config", "tiny", "--threads", "1", "--steps", "2"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LoRA rank 8" in done.stdout and "DxDP update (TD + policy step)" in done.stdout


def test_an_exported_sd_run_loads_in_diffusers_and_reproduces_rewardtune_sample(sd_dir, tmp_path, capsys, monkeypatch):
    import numpy as np
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from rewardtune.export import SAMPLER_FILE, sample_exported

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = sd_recipe(sd_dir, tmp_path / "sd.toml")
    text = recipe.read_text().replace("sampler_lr = 1e-3", "sampler_lr = 3e-2")  # adapters well away from zero
    recipe.write_text(text)
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 0, err
    code, _, err = cli(capsys, "sample", str(tmp_path / "run"), "--prompt", "a red circle", "--prompt", "a cat",
                       "-n", "3", "-o", str(tmp_path / "samples.npz"))
    assert code == 0, err
    code, _, err = cli(capsys, "export", str(tmp_path / "run"), "--to", str(tmp_path / "exported"))
    assert code == 0, err
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "exported")
    assert isinstance(pipeline, StableDiffusionPipeline) and not getattr(pipeline.unet, "peft_config", None)
    spec = json.loads((tmp_path / "exported" / SAMPLER_FILE).read_text())
    assert spec["cfg_scale"] == 2.0 and len(spec["sigma"]) == 2 and spec["settings"]["beta_schedule"] == "scaled_linear"
    expected = torch.from_numpy(np.load(tmp_path / "samples.npz")["samples"])
    got = sample_exported(tmp_path / "exported", 6, prompts=["a red circle"] * 3 + ["a cat"] * 3, seed=0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the adapters alone, in diffusers' format, on the base model give the merged UNet
    base = StableDiffusionPipeline.from_pretrained(sd_dir)
    base.unet.load_lora_adapter(tmp_path / "exported" / "lora", weight_name="pytorch_lora_weights.safetensors", prefix=None)
    z, k, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(base.unet(z, k, states).sample, pipeline.unet(z, k, states).sample,
                                   rtol=1e-4, atol=1e-5)
    assert cli(capsys, "export", str(tmp_path / "run"), "--to", str(tmp_path / "exported"))[0] == 2  # not empty


def test_an_sd_recipe_runs_under_bf16_autocast_and_exports_in_its_precision(sd_dir, tmp_path, capsys, monkeypatch):
    import numpy as np

    from rewardtune.export import sample_exported

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = sd_recipe(sd_dir, tmp_path / "sd.toml")
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"), "--set", "train.steps=2",
                       "--set", "train.mixed_precision=bf16", "--set", "train.skip_nonfinite=true")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped_steps") == 0 for r in records)
    assert json.loads((tmp_path / "run/eval.json").read_text())["metrics"]["reward_mean"] >= 0
    code, _, err = cli(capsys, "sample", str(tmp_path / "run"), "--prompt", "a cat", "-n", "2", "-o", str(tmp_path / "s.npz"))
    assert code == 0, err
    assert cli(capsys, "export", str(tmp_path / "run"), "--to", str(tmp_path / "exported"))[0] == 0
    expected = torch.from_numpy(np.load(tmp_path / "s.npz")["samples"])  # drawn under bf16 autocast: fp32 images
    assert expected.dtype == torch.float32
    got = sample_exported(tmp_path / "exported", 2, prompts=["a cat"] * 2)
    # to bf16's rounding: the export merged the adapters into the weights, which bf16 rounds otherwise than W x + BAx
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05)


@pytest.mark.parametrize("recipe", ["sd15_clip.toml", "sd15_aesthetic.toml"])
def test_the_sd15_recipes_run_with_local_stand_ins(recipe, sd_dir, tiny_clip_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """The shipped recipes, with every downloaded part replaced by a tiny local one (--set, as their comments say),
    run end to end offline on data `none`: the evaluation reports the reward under the prompts, and no Fréchet
    distance (there is no data to compare with)."""
    from rewardtune.rewards.aesthetic import AestheticHead

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = Path(__file__).resolve().parent.parent
    head = tmp_path / "head.pth"
    torch.save(AestheticHead(16).state_dict(), head)
    reward = [f"reward.model=local-dir:{tiny_clip_dir}"] + ([f"reward.head={head}"] if "aesthetic" in recipe else [])
    settings = [f"backbone.pretrained={sd_dir}", f"conditions.text_encoder.model={sd_dir}", f"data.size={SD_IMAGE_SIZE}",
                "value.channels=8", "train.steps=2", "train.batch_size=2", "train.eval_every=2", "eval.num_samples=4",
                "algorithm.value_warmup=1", *reward]
    args = [item for setting in settings for item in ("--set", setting)]
    code, _, err = cli(capsys, "run", str(repo / "recipes" / recipe), "--out", str(tmp_path / "run"), *args)
    assert code == 0, err
    result = json.loads((tmp_path / "run/eval.json").read_text())
    assert result["step"] == 2 and set(result["metrics"]) == set(result["initial_metrics"]) == {"reward_mean"}


def test_the_sd15_recipes_fail_offline_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = Path(__file__).resolve().parent.parent
    code, _, err = cli(capsys, "run", str(repo / "recipes" / "sd15_clip.toml"), "--out", str(tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1 and "offline" in err, err


def test_data_none_gives_the_shape_and_refuses_what_learns_from_data(tmp_path):
    from rewardtune.data.none import build_no_data

    data = build_no_data(size=16)
    assert data.sample_shape == (3, 16, 16) and data.sample(4).shape == (0, 3, 16, 16)
    tables = {
        "data": {"kind": "none", "size": 8},
        "backbone": {"kind": "ddpm", "pretrained": "", "num_steps": 2, "unet": {
            "sample_size": 8, "in_channels": 3, "out_channels": 3, "layers_per_block": 1, "block_out_channels": [8, 16],
            "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
            "norm_num_groups": 4}},
        "algorithm": {"kind": "ddpm"},
    }
    with pytest.raises(RecipeError, match='DDPMPretrain trains on data, but \\[data\\] kind = "none" has none'):
        rt.build_trainer(rt.make_recipe(tables))
    tables |= {"value": {"kind": "resnet", "channels": 8}, "reward": {"kind": "energy"}, "algorithm": {"kind": "dxdp"}}
    with pytest.raises(RecipeError, match="learns from data against the samples"):
        rt.build_trainer(rt.make_recipe(tables))


def test_the_kl_reference_of_a_fresh_lora_run_is_the_base_network_without_a_copy(sd_dir):
    import copy

    from rewardtune.algorithms.dxdp import frozen_reference, gaussian_kl
    from rewardtune.backbones.latent import AdaptersOff

    policy = backbone(sd_dir, lora_rank=2)
    reference = frozen_reference(policy, 0.1)
    assert isinstance(reference, AdaptersOff)
    assert sum(p.numel() for p in reference.parameters()) == policy.num_steps  # its frozen sigma_t, no network
    copied = copy.deepcopy(policy).requires_grad_(False)  # what the reference stands for: the policy at the start
    z, t, c = torch.randn(2, *policy.sample_shape), torch.tensor([0, 1]), prompts("a cat", "red")
    with torch.no_grad():
        for name, p in policy.named_parameters():  # the policy moves away from its start
            if "lora_B" in name:
                p.normal_(0, 0.1)
        policy.log_sigma.add_(0.5)
        torch.testing.assert_close(reference.mean_at(z, t, c), copied.mean_at(z, t, c))
        torch.testing.assert_close(reference.sigma(), copied.sigma())
        kl = gaussian_kl(policy.mean_at(z, t, c), policy.sigma()[t], reference.mean_at(z, t, c), reference.sigma()[t])
    assert bool((kl > 0).all())
    assert not torch.allclose(policy.mean_at(z, t, c), copied.mean_at(z, t, c))  # its adapters are on again
    assert frozen_reference(policy, 0.1).__class__ is not AdaptersOff  # trained adapters: a copy
    assert frozen_reference(backbone(sd_dir), 0.1).__class__ is LatentEpsilonPolicy  # full fine-tuning: a copy


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM", "XLA"])
def test_a_launch_the_trainer_would_not_apply_is_refused_in_one_line(kind):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rewardtune.trainer import check_distributed_type

    with pytest.raises(RecipeError, match=f"launched with {kind}, which rewardtune does not run"):
        check_distributed_type(SimpleNamespace(distributed_type=DistributedType[kind]))
    for supported in ("MULTI_CPU", "MULTI_GPU", "FSDP"):  # data parallel, and FSDP2 sharding (sharding.py)
        check_distributed_type(SimpleNamespace(distributed_type=DistributedType[supported]))


@pytest.mark.parametrize("engine", ["DEEPSPEED", "MEGATRON_LM"])
def test_an_engine_asked_for_only_in_the_environment_is_refused_too(engine, monkeypatch):
    """On CPU processes accelerate leaves the distributed type MULTI_CPU and the request in ACCELERATE_USE_<engine>
    (as it does for FSDP, which sharding.py reads): refused, not run data parallel in silence."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rewardtune.trainer import check_distributed_type

    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
    with pytest.raises(RecipeError, match=f"launched with {engine}, which rewardtune does not run"):
        check_distributed_type(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "false")
    check_distributed_type(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_two_processes_train_an_sd_lora_recipe_sharded_as_they_do_data_parallel(sd_dir, tmp_path):
    """`accelerate launch --config_file recipes/accelerate/fsdp.yaml` with 2 CPU processes on the tiny LoRA recipe
    (tests/sharding_check.py): the UNet's blocks and the EMA's are sharded (each rank holds half of them); after 3
    steps the checkpoint equals the data-parallel run's (weights, and Adam's moments gathered from the shards), whose
    ranks hold identical parameters; and the sharded run resumed from its step-2 checkpoint ends where the
    uninterrupted one did, bit for bit."""
    from test_multiprocess import ENV, ROOT

    recipe = sd_recipe(sd_dir, tmp_path / "sd.toml")
    out = tmp_path / "fsdp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/fsdp.yaml"]
    result = subprocess.run([*launch, "tests/sharding_check.py", str(recipe), str(out), "train.steps=3",
                             "train.checkpoint_every=1", "train.keep_checkpoints=5", "train.ema_decay=0.9"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    verdict_file = out / "verdict.json"
    aborted_after = "terminate called without an active exception" in result.stderr and verdict_file.is_file()
    assert result.returncode == 0 or aborted_after, result.stderr[-3000:]
    verdict = json.loads(verdict_file.read_text())
    assert verdict["launched_fsdp"] and verdict["world_size"] == 2
    assert verdict["sharded_parameters"] > 0 and verdict["local_fraction"] == pytest.approx(0.5, abs=0.05)
    assert verdict["ema_sharded"] and verdict["same_keys"] and verdict["dp_ranks_identical"]
    assert verdict["trained"] > 1e-4  # the adapters moved
    assert verdict["fsdp_vs_dp"] < 1e-6 and verdict["moments_vs_dp"] < 1e-5
    assert verdict["resumed_vs_whole"] == 0.0


def test_components_load_one_by_one_with_sds_schedule(sd_dir, tmp_path):
    """unet, vae and text_encoder folders instead of a pipeline (the text encoder's folder holding its tokenizer);
    without a scheduler config the schedule is SD's own, and the weights are the pipeline's."""
    import shutil

    text = tmp_path / "text"
    shutil.copytree(sd_dir / "text_encoder", text)
    for name in (sd_dir / "tokenizer").iterdir():
        shutil.copy(name, text / name.name)
    torch.manual_seed(0)
    parts = build_sd_backbone(IMAGE, TEXT, pretrained=str(tmp_path / "no_pipeline"), unet=str(sd_dir / "unet"),
                              vae=str(sd_dir / "vae"), text_encoder=str(text), num_steps=3)
    whole = backbone(sd_dir)
    torch.testing.assert_close(parts.alphas_cumprod, whole.alphas_cumprod)  # scaled_linear, as the pipeline's
    z, t, c = torch.randn(2, *parts.sample_shape), torch.tensor([0, 2]), prompts("a cat", "red")
    torch.testing.assert_close(parts.mean_at(z, t, c), whole.mean_at(z, t, c))


def test_the_ema_of_a_lora_backbone_averages_the_adapters_and_shares_the_rest(sd_dir):
    from rewardtune.trainer import EMA

    policy = backbone(sd_dir, lora_rank=2)
    ema = EMA(policy, 0.5)
    live = dict(policy.named_parameters())
    for name, p in ema.module.named_parameters():
        assert (p is live[name]) == (not live[name].requires_grad), name  # frozen: shared; trained: a copy
    assert all(a is b for a, b in zip(ema.module.buffers(), policy.buffers()))
    lora = next(n for n in live if "lora_B" in n)
    with torch.no_grad():
        live[lora].add_(1.0)
    ema.update(policy)  # warm-up decay min(0.5, 2/11): the EMA moves 9/11 of the way
    torch.testing.assert_close(dict(ema.module.named_parameters())[lora], live[lora] * (9 / 11))


@pytest.mark.parametrize(("setting", "message"), [
    ("eval.feature_extractor=helpers:tiny_features", "eval.feature_extractor sets the Fréchet"),
    ("eval.reference_samples=100", "eval.reference_samples sets the Fréchet"),
])
def test_data_none_refuses_fid_settings_it_would_ignore(sd_dir, tiny_clip_dir, setting, message, tmp_path, capsys):  # noqa: F811
    repo = Path(__file__).resolve().parent.parent
    settings = [f"backbone.pretrained={sd_dir}", f"conditions.text_encoder.model={sd_dir}", f"data.size={SD_IMAGE_SIZE}",
                f"reward.model=local-dir:{tiny_clip_dir}", setting]
    args = [item for s in settings for item in ("--set", s)]
    code, _, err = cli(capsys, "run", str(repo / "recipes" / "sd15_clip.toml"), "--out", str(tmp_path / "run"), *args)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_export_refuses_a_file_as_its_folder(sd_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = sd_recipe(sd_dir, tmp_path / "sd.toml")
    assert cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"), "--set", "train.steps=1")[0] == 0
    (tmp_path / "file").write_text("x")
    code, _, err = cli(capsys, "export", str(tmp_path / "run"), "--to", str(tmp_path / "file"))
    assert code == 2 and "is a file" in err


def test_a_lora_run_starts_another_with_its_adapters(sd_dir, tmp_path, capsys, monkeypatch):
    """backbone.init_from of a LoRA run loads its adapters (all its checkpoint holds of the UNet) into a sampler of
    another T, on top of the base model the recipe loads."""
    from safetensors.torch import load_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = sd_recipe(sd_dir, tmp_path / "sd.toml")
    recipe.write_text(recipe.read_text().replace("sampler_lr = 1e-3", "sampler_lr = 3e-2"))
    assert cli(capsys, "run", str(recipe), "--out", str(tmp_path / "first"), "--set", "train.steps=2")[0] == 0
    trained = load_file(tmp_path / "first/checkpoints/step_00000002/model.safetensors")
    second = rt.build_trainer(rt.load_recipe(recipe, [f"backbone.init_from={tmp_path / 'first'}",
                                                      "backbone.num_steps=3"]))
    adapters = {k: v for k, v in second.backbone.state_dict().items() if "lora_" in k}
    assert adapters and second.backbone.num_steps == 3
    for key, value in adapters.items():
        torch.testing.assert_close(value, trained[f"backbone.{key}"], rtol=0, atol=0)
    assert any(bool(v.abs().sum() > 0) for k, v in adapters.items() if "lora_B" in k)  # trained, not the zero start


def test_sample_takes_another_cfg_scale(sd_dir, tmp_path, capsys, monkeypatch):
    import numpy as np

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = sd_recipe(sd_dir, tmp_path / "sd.toml")  # cfg_scale = 2.0
    assert cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"), "--set", "train.steps=1")[0] == 0

    def draw(*options: str) -> np.ndarray:
        out = tmp_path / f"s{len(list(tmp_path.glob('s*.npz')))}.npz"
        code, _, err = cli(capsys, "sample", str(tmp_path / "run"), "--prompt", "a cat", "-n", "2", "-o", str(out), *options)
        assert code == 0, err
        return np.load(out)["samples"]

    default, same, unguided = draw(), draw("--cfg-scale", "2"), draw("--cfg-scale", "1")
    np.testing.assert_array_equal(default, same)
    assert not np.allclose(default, unguided)
    repo = Path(__file__).resolve().parent.parent
    assert cli(capsys, "run", str(repo / "recipes/tiny_8gaussians.toml"), "--out", str(tmp_path / "plain"))[0] == 0
    code, _, err = cli(capsys, "sample", str(tmp_path / "plain"), "--cfg-scale", "2", "-o", str(tmp_path / "p.npz"))
    assert code == 2 and "--cfg-scale" in err and err.count("\n") == 1, err
