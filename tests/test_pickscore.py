"""Reward `pickscore` (rewards/pickscore.py) on a tiny random transformers CLIPModel written with save_pretrained:
the score is transformers' own CLIP logit of each image and its prompt, differentiable in the pixels, per prompt in
a conditional run; bad inputs and a missing model are one-line errors; a recipe runs with it end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import write_tiny_clip_model

from rewardtune.conditions import Conditions
from rewardtune.errors import PluginError
from rewardtune.rewards.pickscore import build_pickscore_reward

transformers = pytest.importorskip("transformers")
PROMPTS = ["a red cat", "a cat", "red"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_tiny_clip_model(tmp_path_factory.mktemp("pickscore"))


def reward(clip_dir: Path, **options):
    return build_pickscore_reward((3, 32, 32), model=str(clip_dir), processor=str(clip_dir), **options)


def test_the_score_is_clips_logit_of_each_image_and_its_own_prompt(clip_dir):
    score = reward(clip_dir)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    x = pixels.float() / 127.5 - 1  # the data convention: [-1, 1]
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    processor = transformers.CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=PROMPTS, images=list(pixels.permute(0, 2, 3, 1).numpy().astype(np.uint8)),
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image  # [images, prompts]
        got = score(x, Conditions(prompts=tuple(PROMPTS)))
    torch.testing.assert_close(got, logits.diagonal(), rtol=1e-4, atol=1e-4)
    averaged = reward(clip_dir, prompts=tuple(PROMPTS))(x)  # unconditional: the mean over `prompts`
    torch.testing.assert_close(averaged, logits.mean(1), rtol=1e-4, atol=1e-4)


def test_the_score_is_differentiable_in_the_pixels(clip_dir):
    x = torch.rand(2, 3, 48, 40, requires_grad=True) * 2 - 1  # another size: resized and cropped in torch
    x.retain_grad()
    reward(clip_dir)(x, Conditions(prompts=("a cat", "red"))).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_bad_pickscore_inputs_are_one_line_errors(clip_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="pickscore needs prompts"):
        reward(clip_dir)(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="class labels"):
        reward(clip_dir)(torch.zeros(1, 3, 32, 32), Conditions.from_labels([1]))
    with pytest.raises(ValueError, match="needs images"):
        build_pickscore_reward((2,), model=str(clip_dir), processor=str(clip_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PluginError, match="pickscore: cannot load .*offline, point reward.model") as info:
        build_pickscore_reward((3, 32, 32), model=str(tmp_path / "nowhere"))
    assert "\n" not in str(info.value)


def test_an_sd_recipe_tunes_for_pickscore(clip_dir, tmp_path, capsys, monkeypatch):
    import json

    from test_cli import cli
    from test_latent import sd_recipe
    from tiny_models import write_tiny_sd_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd_dir = write_tiny_sd_pipeline(tmp_path / "sd")
    recipe = sd_recipe(sd_dir, tmp_path / "sd.toml")
    text = recipe.read_text().replace('kind = "shapes"\npartial = true',
                                      f'kind = "pickscore"\nmodel = "{clip_dir}"\nprocessor = "{clip_dir}"')
    recipe.write_text(text)
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"), "--set", "train.steps=2")
    assert code == 0, err
    assert "reward_mean" in json.loads((tmp_path / "run/eval.json").read_text())["metrics"]
