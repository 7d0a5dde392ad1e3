"""The latent flow-matching text-to-image backbone `sd3` (backbones/sd3.py) on a tiny random SD3-layout pipeline
without T5, written with save_pretrained: loading with the scheduler's shift, Gaussian log-probs, prompts through the
pipeline's encode_prompt, CFG with the empty prompt, LoRA-only checkpoints, and a recipe run end to end (run,
sample, export, reload in diffusers, the exported sampler reproducing `rewardtune sample`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import cli
from test_latent import sd_recipe
from test_rewards import tiny_clip_dir  # noqa: F401  (fixture: a tiny open_clip model folder)
from tiny_models import SD_IMAGE_SIZE, write_tiny_sd3_pipeline
from torch.distributions import Normal

from rewardtune.backbones.flow import flow_levels
from rewardtune.backbones.sd3 import LatentFlowPolicy, build_sd3_backbone
from rewardtune.conditions import Conditions
from rewardtune.nets.conditioning import Conditioning

pytest.importorskip("transformers")
pytest.importorskip("peft")

TEXT = Conditioning(text_dim=8)
IMAGE = (3, SD_IMAGE_SIZE, SD_IMAGE_SIZE)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return write_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny") / "sd3")


def backbone(sd3_dir: Path, **options) -> LatentFlowPolicy:
    torch.manual_seed(0)
    options = {"num_steps": 3, "use_t5": False, "max_sequence_length": 8, **options}
    return build_sd3_backbone(IMAGE, TEXT, pretrained=str(sd3_dir), **options)


def test_the_pipeline_loads_with_its_shift_and_latent_shape(sd3_dir):
    policy = backbone(sd3_dir)
    assert policy.sample_shape == (4, SD_IMAGE_SIZE // 2, SD_IMAGE_SIZE // 2)
    assert policy.shift == 3.0 and policy.cfg_scale == 4.5  # the scheduler's shift; Flow-GRPO's guidance
    torch.testing.assert_close(policy.levels.double(), flow_levels(3, 3.0)[:3].float().double())
    assert backbone(sd3_dir, shift=1.0).shift == 1.0
    with pytest.raises(ValueError, match="has no T5 \\(text_encoder_3\\); set backbone.use_t5 = false"):
        backbone(sd3_dir, use_t5=True)


def test_sd3_log_probs_are_gaussian_and_the_prompt_reaches_the_transformer(sd3_dir):
    policy = backbone(sd3_dir)
    z, z_next = torch.randn(3, *policy.sample_shape), torch.randn(3, *policy.sample_shape)
    t, c = torch.tensor([0, 1, 2]), Conditions(prompts=("a red cat", "a cat", "red"))
    mean = policy.mean_at(z, t, c)
    expected = Normal(mean, policy.sigma()[t].view(-1, 1, 1, 1)).log_prob(z_next).flatten(1).sum(1)
    torch.testing.assert_close(policy.log_prob(z_next, z, t, c), expected, rtol=1e-5, atol=1e-4)
    other = policy.mean_at(z, t, Conditions(prompts=("a cat", "red", "a red cat")))
    assert all(not torch.allclose(mean[i], other[i]) for i in range(3))


def test_sd3_cfg_uses_the_empty_prompt(sd3_dir):
    policy = backbone(sd3_dir, cfg_scale=3.0)
    z, s, c = torch.randn(2, *policy.sample_shape), torch.tensor([0.9, 0.3]), Conditions(prompts=("a cat", "red"))
    states, pooled = policy.prompt_states(["a cat", "red"])
    null_states, null_pooled = policy.prompt_states(["", ""])
    v_c = policy.velocity(z, 1000 * s, states, pooled)
    v_u = policy.velocity(z, 1000 * s, null_states, null_pooled)
    torch.testing.assert_close(policy.predict_velocity(z, s, c), v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(policy.predict_velocity(z, s, c, cfg_scale=1.0), v_c)


def test_sd3_lora_checkpoints_only_the_adapters(sd3_dir):
    plain, adapted = backbone(sd3_dir), backbone(sd3_dir, lora_rank=2)
    z, t, c = torch.randn(2, *plain.sample_shape), torch.tensor([0, 2]), Conditions(prompts=("a cat", "red"))
    torch.testing.assert_close(adapted.mean_at(z, t, c), plain.mean_at(z, t, c))  # LoRA's B starts at zero
    state = adapted.state_dict()
    network = [k for k in state if k.startswith("velocity_net.")]
    assert network and all("lora_" in k for k in network) and not any(k.startswith(("vae.", "prompt_states.")) for k in state)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    fresh = backbone(sd3_dir, lora_rank=2)
    fresh.load_state_dict(adapted.state_dict(), strict=True)
    torch.testing.assert_close(fresh.mean_at(z, t, c), adapted.mean_at(z, t, c))


def test_an_sd3_recipe_runs_samples_and_exports_to_diffusers(sd3_dir, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    from rewardtune.export import sample_exported

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = sd_recipe(sd3_dir, tmp_path / "sd3.toml")
    text = recipe.read_text().replace('kind = "sd"\n', 'kind = "sd3"\nuse_t5 = false\nmax_sequence_length = 8\n')
    recipe.write_text(text.replace("sampler_lr = 1e-3", "sampler_lr = 3e-2"))
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert json.loads((tmp_path / "run/eval.json").read_text())["metrics"]["reward_mean"] >= 0
    code, _, err = cli(capsys, "sample", str(tmp_path / "run"), "--prompt", "a red circle", "-n", "3",
                       "-o", str(tmp_path / "samples.npz"))
    assert code == 0, err
    code, _, err = cli(capsys, "export", str(tmp_path / "run"), "--to", str(tmp_path / "exported"))
    assert code == 0, err
    pipeline = StableDiffusion3Pipeline.from_pretrained(tmp_path / "exported", text_encoder_3=None, tokenizer_3=None)
    assert pipeline.scheduler.config.shift == 3.0 and not getattr(pipeline.transformer, "peft_config", None)
    expected = torch.from_numpy(np.load(tmp_path / "samples.npz")["samples"])
    got = sample_exported(tmp_path / "exported", 3, prompts=["a red circle"] * 3, seed=0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_sd3_recipe_runs_with_local_stand_ins(sd3_dir, tiny_clip_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = Path(__file__).resolve().parent.parent
    settings = [f"backbone.pretrained={sd3_dir}", f"conditions.text_encoder.model={sd3_dir}", f"data.size={SD_IMAGE_SIZE}",
                f"reward.model=local-dir:{tiny_clip_dir}", "backbone.max_sequence_length=8", "value.channels=8",
                "train.steps=2", "train.batch_size=2", "train.eval_every=2", "eval.num_samples=4", "algorithm.value_warmup=1"]
    args = [item for setting in settings for item in ("--set", setting)]
    code, _, err = cli(capsys, "run", str(repo / "recipes" / "sd3_clip.toml"), "--out", str(tmp_path / "run"), *args)
    assert code == 0, err
    result = json.loads((tmp_path / "run/eval.json").read_text())
    assert result["step"] == 2 and set(result["metrics"]) == {"reward_mean"}
    code, _, err = cli(capsys, "run", str(repo / "recipes" / "sd3_clip.toml"), "--out", str(tmp_path / "offline"))
    assert code == 2 and err.count("\n") == 1, err  # as shipped, offline: one line
