"""Text encoders (rewardtune/text_encoders.py): the `hash` stand-in, open_clip's text tower through "local-dir:",
transformers' CLIPTextModel from a save_pretrained folder, the per-prompt cache, `encode_conditions`, and the
one-line errors.

No network and no downloaded weights: the models are random 1-layer towers written to temp folders, and the
transformers tokenizer is a byte-level BPE vocabulary written here (vocab.json + merges.txt).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import clip_text_config, write_clip_tokenizer

from rewardtune import text_encoders
from rewardtune.conditions import Conditions
from rewardtune.errors import PluginError, RecipeError
from rewardtune.text_encoders import HashTextEncoder, TextEncoder, build_text_encoder

PROMPTS = ["a red circle left of a blue square", "a blue square left of a red circle", "a cat", "a photo of a dog"]
TINY_OPEN_CLIP = {  # open_clip's default tokenizer gives ids up to 49407, hence the full vocabulary
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def count_embedded(encoder: TextEncoder, monkeypatch) -> list[str]:
    """Record every prompt the encoder computes (not served from the cache)."""
    seen: list[str] = []
    embed = encoder.embed

    def spy(prompts):
        seen.extend(prompts)
        return embed(prompts)

    monkeypatch.setattr(encoder, "embed", spy)
    return seen


# ---------------------------------------------------------------------------------------------------------------------
# hash: the contract without weights
# ---------------------------------------------------------------------------------------------------------------------
def test_hash_shape_determinism_and_word_order():
    encoder = build_text_encoder({"kind": "hash", "dim": 32})
    embeddings = encoder.encode(PROMPTS)
    assert embeddings.shape == (4, 32) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4), rtol=0, atol=1e-6)  # float32 unit norm
    fresh = HashTextEncoder(32).encode(PROMPTS)  # another instance: the vectors come from hashes, not state
    torch.testing.assert_close(fresh, embeddings, rtol=0, atol=0)
    assert (embeddings[0] - embeddings[1]).abs().max() > 0.1  # same words, other order
    assert torch.pdist(embeddings).min() > 0.1  # every prompt its own embedding
    other_seed = HashTextEncoder(32, seed=1).encode(PROMPTS)
    assert (other_seed - embeddings).abs().max() > 0.1


def test_hash_tokens():
    encoder = HashTextEncoder(8)
    torch.testing.assert_close(encoder.encode(["A Cat."]), encoder.encode(["a cat"]), rtol=0, atol=0)
    assert encoder.encode(["zyzzyva quokka"]).abs().sum() > 0  # unseen words embed
    assert encoder.encode(["  ..."]).abs().sum() == 0  # no words: zeros


def test_cache_computes_each_prompt_once(monkeypatch):
    encoder = HashTextEncoder(16)
    seen = count_embedded(encoder, monkeypatch)
    first = encoder.encode(["a cat", "a dog", "a cat"])
    assert seen == ["a cat", "a dog"] and encoder.cache_size == 2
    torch.testing.assert_close(first[0], first[2], rtol=0, atol=0)
    again = encoder.encode(["a dog", "a cat", "a bird"])
    assert seen == ["a cat", "a dog", "a bird"]  # only the new prompt is computed
    torch.testing.assert_close(again[:2], first[[1, 0]], rtol=0, atol=0)
    assert encoder.encode([]).shape == (0, 16)
    encoder.clear_cache()
    encoder.encode(["a cat"])
    assert seen[-1] == "a cat"


def test_many_new_prompts_are_encoded_in_chunks(monkeypatch):
    monkeypatch.setattr(text_encoders, "CHUNK", 3)
    encoder = HashTextEncoder(8)
    calls = []
    embed = encoder.embed
    monkeypatch.setattr(encoder, "embed", lambda prompts: calls.append(len(prompts)) or embed(prompts))
    prompts = [f"prompt {i}" for i in range(7)]
    torch.testing.assert_close(encoder.encode(prompts), HashTextEncoder(8).embed(prompts), rtol=0, atol=0)
    assert calls == [3, 3, 1]


def test_encode_conditions():
    encoder = HashTextEncoder(16)
    conditions = Conditions.from_prompts(["a cat", "a dog", "a cat"], metadata=[{"n": 1}, {"n": 2}, {"n": 1}])
    encoded = encoder.encode_conditions(conditions)
    assert encoded.prompts == conditions.prompts and encoded.metadata == conditions.metadata
    torch.testing.assert_close(encoded.embeddings, encoder.encode(conditions.prompts), rtol=0, atol=0)
    assert encoded.tensor().shape == (3, 16)
    labels = Conditions.from_labels([0, 1])
    assert encoder.encode_conditions(labels) is labels


def test_frozen_and_stays_in_eval_mode():
    encoder = HashTextEncoder(8)
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    with pytest.raises(TypeError, match="sequence of prompts"):
        encoder.encode("a cat")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"kind": "hash", "dims": 8}, r"text_encoder\.dims: unknown key for kind 'hash' \(did you mean 'dim'\?\)"),
        ({"kind": "hash", "dim": 0}, r"text_encoder\.dim: must be >= 1"),
        ({"kind": "hash", "normalize": "yes"}, r"text_encoder\.normalize: expected a boolean"),
        ({"kind": "openclip"}, r"text_encoder\.kind: unknown kind 'openclip' \(did you mean 'open_clip'\?\)"),
        ({"dim": 8}, r"text_encoder\.kind: missing"),
        ({"kind": "open_clip", "projection": True}, r"text_encoder\.projection: unknown key for kind 'open_clip'"),
        ({"kind": "clip_transformers", "model": ""}, r"text_encoder\.model: must name a model"),
    ],
)
def test_option_errors(options, match):
    with pytest.raises(RecipeError, match=match):
        build_text_encoder(options)


# ---------------------------------------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_open_clip_dir(tmp_path_factory) -> Path:
    """A random 1-layer open_clip model saved as open_clip_config.json + open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("tiny_open_clip")
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{path}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


def test_open_clip_matches_the_text_tower(tiny_open_clip_dir):
    import open_clip

    encoder = build_text_encoder({"kind": "open_clip", "model": f"local-dir:{tiny_open_clip_dir}"})
    embeddings = encoder.encode(PROMPTS)
    assert embeddings.shape == (4, 16) and encoder.embedding_dim == 16 and embeddings.dtype == torch.float32

    model = open_clip.create_model(f"local-dir:{tiny_open_clip_dir}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_open_clip_dir}")
    with torch.no_grad():
        expected = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)  # [4, 16]
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-6)  # float32, same ops in the same order
    assert torch.pdist(embeddings).min() > 1e-3  # different prompts, different embeddings

    alone = build_text_encoder({"kind": "open_clip", "model": f"local-dir:{tiny_open_clip_dir}"}).encode(PROMPTS[2:3])
    torch.testing.assert_close(alone, embeddings[2:3], rtol=1e-5, atol=1e-6)  # independent of the batch (float32)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    assert encoder.state_dict() == {}  # the frozen tower is rebuilt from its source, not checkpointed


def test_open_clip_without_normalisation(tiny_open_clip_dir):
    encoder = build_text_encoder({"kind": "open_clip", "model": f"local-dir:{tiny_open_clip_dir}", "normalize": False})
    raw = encoder.encode(PROMPTS)
    assert (raw.norm(dim=1) - 1).abs().max() > 1e-3
    normalised = build_text_encoder({"kind": "open_clip", "model": f"local-dir:{tiny_open_clip_dir}"}).encode(PROMPTS)
    torch.testing.assert_close(F.normalize(raw, dim=-1), normalised, rtol=1e-5, atol=1e-6)  # float32


@pytest.mark.parametrize("name", ["local-dir:{tmp}/missing", "hf-hub:nobody/no-such-clip"])
def test_open_clip_failures_are_one_line(tmp_path, name):
    with pytest.raises(PluginError, match=r"^text_encoder: cannot load open_clip model .*local-dir") as err:
        build_text_encoder({"kind": "open_clip", "model": name.format(tmp=tmp_path)})
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_transformers_clip_dir(tmp_path_factory) -> Path:
    """A random 1-layer CLIPTextModelWithProjection and a byte-level BPE tokenizer, written by save_pretrained."""
    transformers = pytest.importorskip("transformers")

    path = tmp_path_factory.mktemp("tiny_clip_text")
    config = clip_text_config(write_clip_tokenizer(path))
    torch.manual_seed(0)
    transformers.CLIPTextModelWithProjection(config).save_pretrained(path)
    return path


@pytest.mark.parametrize(("projection", "dim"), [(False, 16), (True, 8)])
def test_transformers_clip(tiny_transformers_clip_dir, projection, dim):
    import transformers

    options = {"kind": "clip_transformers", "model": str(tiny_transformers_clip_dir), "projection": projection}
    encoder = build_text_encoder(options)
    embeddings = encoder.encode(PROMPTS)
    assert embeddings.shape == (4, dim) and encoder.embedding_dim == dim and embeddings.dtype == torch.float32
    assert torch.pdist(embeddings).min() > 1e-4  # different prompts, different embeddings

    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls.from_pretrained(tiny_transformers_clip_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_transformers_clip_dir)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model(input_ids=ids)
    expected = output.text_embeds if projection else output.pooler_output  # [4, dim]
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-6)  # float32, same ops in the same order

    alone = build_text_encoder(options).encode(PROMPTS[2:3])
    torch.testing.assert_close(alone, embeddings[2:3], rtol=1e-5, atol=1e-6)  # padded to full length: batch-free
    assert encoder.state_dict() == {} and not any(p.requires_grad for p in encoder.parameters())


def test_transformers_clip_normalize(tiny_transformers_clip_dir):
    options = {"kind": "clip_transformers", "model": str(tiny_transformers_clip_dir), "normalize": True}
    embeddings = build_text_encoder(options).encode(PROMPTS)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4), rtol=0, atol=1e-6)  # float32 unit norm


@pytest.mark.parametrize("name", ["nobody/no-such-clip-text-model", "{tmp}/missing"])
def test_transformers_clip_failures_are_one_line(tmp_path, name):
    pytest.importorskip("transformers")
    with pytest.raises(PluginError, match=r"^cannot load CLIP text model .*point text_encoder\.model at") as err:
        build_text_encoder({"kind": "clip_transformers", "model": name.format(tmp=tmp_path)})
    assert "\n" not in str(err.value)


def test_open_clip_random_tower_is_frozen_deterministic_and_offline(tmp_path):
    """random_init_seed: the tokenizer and transformer of an open_clip architecture with random weights drawn at the
    seed (nothing downloaded); the same seed gives the same embeddings, another seed others."""
    import open_clip

    (tmp_path / "rt-tiny-text.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp_path / "rt-tiny-text.json")
    options = {"kind": "open_clip", "model": "rt-tiny-text", "pretrained": "", "random_init_seed": 0}
    first, again = build_text_encoder(options), build_text_encoder(options)
    other = build_text_encoder({**options, "random_init_seed": 1})
    prompts = ["a red circle", "a blue square to the left of a red circle"]
    torch.testing.assert_close(first.encode(prompts), again.encode(prompts))
    assert not torch.allclose(first.encode(prompts), other.encode(prompts))
    assert not any(p.requires_grad for p in first.parameters())
    with pytest.raises(RecipeError, match="pretrained"):
        build_text_encoder({**options, "pretrained": "openai"})
    with pytest.raises(RecipeError, match="not an open_clip architecture"):
        build_text_encoder({**options, "model": "no-such-model"})


def test_supply_embeds_every_training_prompt_once(tmp_path, monkeypatch):
    """`ConditionSupply.embed_training_prompts` fills the cache with the training split (not the held-out one), and
    the rollouts' draws then embed nothing new."""
    from rewardtune.condition_supply import build_condition_supply

    supply = build_condition_supply(
        {"kind": "prompts", "prompts": ["a cat", "a dog", "a bird", "a fish", "a cow"], "held_out": 0.2,
         "text_encoder": {"kind": "hash", "dim": 8}},
        data=None,
        base_dir=tmp_path,
    )
    seen = count_embedded(supply.encoder, monkeypatch)
    train, held_out = supply.source.split("train").prompts, supply.source.split("held_out").prompts
    assert len(train) == 4 and len(held_out) == 1
    assert supply.embed_training_prompts() == 4
    assert sorted(seen) == sorted(train)
    drawn = supply.rollout_conditions(32, torch.Generator().manual_seed(0), None, "cpu")
    assert len(seen) == 4 and drawn.embeddings.shape == (32, 8)
