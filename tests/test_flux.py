"""Backbone `flux` on a tiny random FLUX.1-layout pipeline written with save_pretrained (tests/tiny_models.py): the
same contract as sd3 (log-probs, prompts, LoRA) plus what FLUX adds: 2x2-packed latents, timesteps and distilled
guidance in [0, 1] units, and the resolution-dependent shift; checked against FluxPipeline's own helpers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import cli
from test_latent import sd_recipe
from test_rewards import tiny_clip_dir  # noqa: F401  (fixture: a tiny open_clip model folder)
from tiny_models import SD_IMAGE_SIZE, write_tiny_flux_pipeline
from torch.distributions import Normal

from rewardtune.backbones.flow import flow_levels
from rewardtune.backbones.flux import (
    FluxPolicy,
    build_flux_backbone,
    flux_shift,
    latent_position_ids,
    pack_latents,
    unpack_latents,
)
from rewardtune.conditions import Conditions
from rewardtune.nets.conditioning import Conditioning

pytest.importorskip("transformers")
pytest.importorskip("peft")

TEXT = Conditioning(text_dim=8)
IMAGE = (3, SD_IMAGE_SIZE, SD_IMAGE_SIZE)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return write_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny") / "flux")


def backbone(flux_dir: Path, **options) -> FluxPolicy:
    torch.manual_seed(0)
    return build_flux_backbone(IMAGE, TEXT, pretrained=str(flux_dir), **{"num_steps": 3, "max_sequence_length": 8,
                                                                          **options})


def prompts(*texts: str) -> Conditions:
    return Conditions(prompts=texts)


def test_packing_is_fluxpipelines():
    from diffusers import FluxPipeline

    z = torch.randn(2, 4, 6, 8)
    packed = pack_latents(z)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(z, 2, 4, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 8), z, rtol=0, atol=0)
    # FluxPipeline unpacks from the pixel size and the VAE factor (here 2): 12 x 16 pixels are 6 x 8 latents
    torch.testing.assert_close(unpack_latents(packed, 6, 8), FluxPipeline._unpack_latents(packed, 12, 16, 2))
    torch.testing.assert_close(latent_position_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


def test_the_shift_is_the_schedulers_for_this_image_size(flux_dir):
    """FLUX's dynamic shift exp(mu) reproduces the levels FluxPipeline sets its scheduler to (mu from the number of
    packed patches), and a static scheduler's shift is taken as it is."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    policy = backbone(flux_dir)
    assert policy.sample_shape == (4, SD_IMAGE_SIZE // 2, SD_IMAGE_SIZE // 2) and policy.guidance_scale == 3.5
    patches = (SD_IMAGE_SIZE // 4) ** 2
    config = policy.prompt_states.pipeline[0].scheduler.config
    mu = calculate_shift(patches, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    assert math.isclose(policy.shift, math.exp(mu), rel_tol=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=mu)  # FluxPipeline's call for 3 steps
    levels = policy.levels.double().cpu()  # s_0..s_{T-1}, the level each transition starts from
    torch.testing.assert_close(levels, scheduler.sigmas.double()[:3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(levels, flow_levels(3, math.exp(mu))[:3])
    assert flux_shift({"use_dynamic_shifting": False, "shift": 3.0}, (16, 64, 64)) == 3.0


def test_the_velocity_is_the_transformer_called_as_fluxpipeline_calls_it(flux_dir):
    from diffusers import FluxPipeline

    policy = backbone(flux_dir)
    pipeline = policy.prompt_states.pipeline[0]
    z, s = torch.randn(2, *policy.sample_shape), torch.tensor([0.9, 0.4])
    condition = prompts("a red circle", "a blue square")
    with torch.no_grad():
        embeds, pooled, text_ids = pipeline.encode_prompt(list(condition.prompts), None, max_sequence_length=8)
        h, w = policy.sample_shape[1:]
        out = pipeline.transformer(
            hidden_states=FluxPipeline._pack_latents(z, 2, 4, h, w), timestep=s, guidance=torch.full((2,), 3.5),
            pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
            img_ids=FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32),
        ).sample
        expected = FluxPipeline._unpack_latents(out, SD_IMAGE_SIZE, SD_IMAGE_SIZE, 2)
        got = policy.predict_velocity(z, s, condition)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        other = backbone(flux_dir, guidance_scale=7.0).predict_velocity(z, s, condition)
        assert not torch.allclose(got, other)  # the distilled guidance reaches the transformer
        swapped = policy.predict_velocity(z, s, prompts("a blue square", "a red circle"))
        assert not torch.allclose(got, swapped)  # so do the prompts


def test_flux_log_probs_are_gaussian(flux_dir):
    policy = backbone(flux_dir)
    x, t = torch.randn(2, *policy.sample_shape), torch.tensor([0, 1])
    condition = prompts("a cat", "a dog")
    with torch.no_grad():
        mean, sigma = policy.mean_at(x, t, condition), policy.sigma()[t]
        y = mean + sigma.view(-1, 1, 1, 1) * torch.randn_like(x)
        expected = Normal(mean, sigma.view(-1, 1, 1, 1)).log_prob(y).flatten(1).sum(1)
        torch.testing.assert_close(policy.log_prob(y, x, t, condition), expected, rtol=1e-5, atol=1e-3)


def test_guidance_for_a_transformer_without_it_and_bad_folders_are_one_line_errors(tmp_path, flux_dir):
    schnell = write_tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)
    assert backbone(schnell).guidance_scale is None
    with pytest.raises(ValueError, match="no guidance embeddings"):
        backbone(schnell, guidance_scale=3.5)
    from rewardtune.errors import PluginError

    with pytest.raises(PluginError, match="cannot load the FLUX pipeline") as caught:
        backbone(tmp_path / "nothing")
    assert "\n" not in str(caught.value)


def flux_recipe(flux_dir: Path, path: Path) -> Path:
    recipe = sd_recipe(flux_dir, path)
    text = recipe.read_text().replace('kind = "sd"\n', 'kind = "flux"\nmax_sequence_length = 8\n')
    recipe.write_text(text.replace("cfg_scale = 2.0\n", "cfg_scale = 1.0\n").replace("sampler_lr = 1e-3", "sampler_lr = 3e-2"))
    return recipe


def test_a_flux_recipe_runs_samples_and_exports_to_diffusers(flux_dir, tmp_path, capsys, monkeypatch):
    """LoRA run through the CLI: only the adapters are checkpointed; the export loads as a FluxPipeline with the
    adapters merged, and its sampler reproduces `rewardtune sample`."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from rewardtune.export import sample_exported

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = flux_recipe(flux_dir, tmp_path / "flux.toml")
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 0, err
    weights = load_file(tmp_path / "run/checkpoints/step_00000004/model.safetensors")
    network = [k for k in weights if k.startswith("backbone.velocity_net.")]
    assert network and all("lora_" in k for k in network)
    code, _, err = cli(capsys, "sample", str(tmp_path / "run"), "--prompt", "a red circle", "-n", "3",
                       "-o", str(tmp_path / "samples.npz"))
    assert code == 0, err
    code, _, err = cli(capsys, "export", str(tmp_path / "run"), "--to", str(tmp_path / "exported"))
    assert code == 0, err
    pipeline = FluxPipeline.from_pretrained(tmp_path / "exported")
    assert not getattr(pipeline.transformer, "peft_config", None)
    spec = json.loads((tmp_path / "exported/rewardtune_sampler.json").read_text())
    assert spec["backbone"] == "flux" and spec["guidance_scale"] == 3.5
    expected = torch.from_numpy(np.load(tmp_path / "samples.npz")["samples"])
    got = sample_exported(tmp_path / "exported", 3, prompts=["a red circle"] * 3, seed=0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_flux_recipe_fails_offline_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = Path(__file__).resolve().parent.parent
    code, _, err = cli(capsys, "run", str(repo / "recipes" / "flux_clip.toml"), "--out", str(tmp_path / "offline"))
    assert code == 2 and err.count("\n") == 1, err


def test_the_flux_recipe_runs_with_local_stand_ins(flux_dir, tiny_clip_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = Path(__file__).resolve().parent.parent
    settings = [f"backbone.pretrained={flux_dir}", f"conditions.text_encoder.model={flux_dir}",
                f"data.size={SD_IMAGE_SIZE}", f"reward.model=local-dir:{tiny_clip_dir}", "backbone.max_sequence_length=8",
                "value.channels=8", "train.steps=2", "train.batch_size=2", "train.eval_every=2", "eval.num_samples=4",
                "algorithm.value_warmup=1"]
    args = [item for setting in settings for item in ("--set", setting)]
    code, _, err = cli(capsys, "run", str(repo / "recipes" / "flux_clip.toml"), "--out", str(tmp_path / "run"), *args)
    assert code == 0, err
    result = json.loads((tmp_path / "run/eval.json").read_text())
    assert result["step"] == 2 and set(result["metrics"]) == {"reward_mean"}
