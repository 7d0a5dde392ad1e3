"""Text encoders: prompts -> embeddings [N, E], the condition networks see for text (the `[text_encoder]` table).

A text encoder is a frozen network (no gradients, always in eval mode) that turns prompts into float32 embeddings
on its device. Prompt sets are finite, so every prompt is encoded once and its embedding cached on the CPU.
`encode_conditions` fills `Conditions.embeddings` from `Conditions.prompts`. `kind` picks one of:

    [text_encoder]
    kind = "open_clip"                # open_clip's text tower (Radford et al., 2021; Cherti et al., 2023)
    model = "ViT-B-32"                # a model name, "hf-hub:org/repo", or "local-dir:/path" (offline)
    pretrained = "openai"             # the weights tag of a plain model name
    normalize = true                  # L2-normalise the embeddings (the space CLIP compares in)
    cache_dir = ""                    # where downloads go ("" = the Hugging Face cache)
    random_init_seed = -1             # >= 0 (with pretrained = ""): random weights drawn at this seed, frozen; the
                                      # real tokenizer and transformer with nothing downloaded (offline benchmarks)

    [text_encoder]
    kind = "clip_transformers"        # transformers' CLIPTextModel, as Stable Diffusion uses it
    model = "openai/clip-vit-large-patch14"   # a hub name or a folder written by save_pretrained
    subfolder = ""                    # e.g. "text_encoder" inside a diffusers pipeline folder
    tokenizer_subfolder = ""          # e.g. "tokenizer" ("" = the same as subfolder)
    projection = false                # true: CLIPTextModelWithProjection's text_embeds, else the pooled output
    normalize = false
    cache_dir = ""

    [text_encoder]
    kind = "hash"                     # no weights: a deterministic stand-in for tests and shape benchmarks
    dim = 64
    seed = 0
    normalize = true

`hash` is not a language model: it knows no word's meaning and no two words' relation. Each lower-cased word
(whitespace-separated, surrounding punctuation stripped) gets a fixed Gaussian vector seeded by a hash of the word,
so any word, seen or not, embeds; position i multiplies its word's vector by a fixed vector 1 + g_i, so word order
matters ("a red circle left of a blue square" and "a blue square left of a red circle" differ); the embedding is
the mean over the words.

Models that cannot be loaded (offline, a wrong path) are a one-line `PluginError`; bad table keys a `RecipeError`
("text_encoder.dim: ..."). The device is set afterwards with `.to(device)`. Weights stay out of `state_dict()`: the
encoder is rebuilt from its source.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.condition_sources import Option, validate_options
from rewardtune.conditions import Conditions
from rewardtune.errors import PluginError, RecipeError
from rewardtune.nets.frozen import keep_out_of_checkpoints
from rewardtune.quiet import quiet_libraries

CHUNK = 256  # prompts encoded per forward pass when many are new


class TextEncoder(nn.Module):
    """A frozen prompt encoder with a per-prompt cache.

    Subclasses implement `embed(prompts) -> [N, E]` (uncached, on the encoder's device) and call `freeze()` at the
    end of `__init__`.

    Args:
        embedding_dim: E, the size of one embedding.
    """

    kind: ClassVar[str] = ""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.embedding_dim = int(embedding_dim)
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # only tells the device
        self._cache: dict[str, torch.Tensor] = {}  # prompt -> float32 [E] on the CPU

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def freeze(self) -> None:
        """No gradients, eval mode."""
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        """Stays in eval mode: a frozen encoder must embed a prompt the same way in every phase."""
        return super().train(False)

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Embeddings [N, E] of `prompts`, uncached."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings of `prompts`: float32 [N, E] on the encoder's device; prompts seen before come from the cache."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a sequence of prompts, not one string")
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        for start in range(0, len(new), CHUNK):
            chunk = new[start : start + CHUNK]
            embeddings = self.embed(chunk)  # [n, E]
            if tuple(embeddings.shape) != (len(chunk), self.embedding_dim):
                raise PluginError(
                    f"text encoder {self.kind or type(self).__name__!r} returned shape {tuple(embeddings.shape)} "
                    f"for {len(chunk)} prompts; expected ({len(chunk)}, {self.embedding_dim})"
                )
            for prompt, row in zip(chunk, embeddings.float().cpu(), strict=True):
                self._cache[prompt] = row.clone()
        if not prompts:
            return torch.zeros(0, self.embedding_dim, device=self.device)
        return torch.stack([self._cache[p] for p in prompts]).to(self.device)  # [N, E]

    def encode_conditions(self, conditions: Conditions) -> Conditions:
        """`conditions` with `embeddings` [B, E] encoded from its prompts (unchanged when it has none)."""
        if conditions.prompts is None:
            return conditions
        return replace(conditions, embeddings=self.encode(conditions.prompts))

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()


# ---------------------------------------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------------------------------------
class OpenClipTextEncoder(TextEncoder):
    """`model.encode_text(tokenizer(prompts))`, L2-normalised when `normalize`.

    Args:
        model: an open_clip model (its image tower is dropped).
        tokenizer: its tokenizer (prompts -> token ids [N, L]).
        normalize: L2-normalise each embedding.
    """

    kind: ClassVar[str] = "open_clip"

    def __init__(self, model: nn.Module, tokenizer, *, normalize: bool = True) -> None:
        with torch.no_grad():  # towers without a declared output size: measure it
            dim = model.encode_text(tokenizer([""])).shape[-1]
        super().__init__(dim)
        if isinstance(getattr(model, "visual", None), nn.Module):
            model.visual = None  # the image tower is half the memory and never used here
        self.model = model
        self.tokenizer = tokenizer
        self.normalize = normalize
        keep_out_of_checkpoints(self, "model")
        self.freeze()

    def embed(self, prompts: list[str]) -> torch.Tensor:
        embeddings = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()  # [N, E]
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings


# ---------------------------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------------------------
class TransformersClipTextEncoder(TextEncoder):
    """transformers' CLIP text model: the pooled output (the EOS token's final state), or `text_embeds` (its
    projection) for a `CLIPTextModelWithProjection`.

    Prompts are padded to the tokenizer's full length (as Stable Diffusion does), so an embedding does not depend on
    the other prompts of its batch, and truncated to it.

    Args:
        model: a `CLIPTextModel` or `CLIPTextModelWithProjection`.
        tokenizer: its tokenizer.
        normalize: L2-normalise each embedding.
    """

    kind: ClassVar[str] = "clip_transformers"

    def __init__(self, model: nn.Module, tokenizer, *, normalize: bool = False) -> None:
        projection = hasattr(model, "text_projection")
        config = model.config
        super().__init__(config.projection_dim if projection else config.hidden_size)
        self.projection = projection
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = min(int(tokenizer.model_max_length), int(config.max_position_embeddings))
        self.normalize = normalize
        keep_out_of_checkpoints(self, "model")
        self.freeze()

    def embed(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        output = self.model(input_ids=tokens.input_ids.to(self.device))
        embeddings = (output.text_embeds if self.projection else output.pooler_output).float()  # [N, E]
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings


def load_clip_text_model(model: str, *, subfolder: str, tokenizer_subfolder: str, projection: bool, cache_dir: str):
    """(frozen CLIP text model in eval mode, its tokenizer) from transformers, or a one-line PluginError."""
    try:
        from transformers import (
            AutoTokenizer,
            CLIPTextModel,
            CLIPTextModelWithProjection,
        )
    except ImportError:
        raise PluginError(
            "text_encoder kind 'clip_transformers' needs transformers: pip install transformers"
        ) from None
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    try:
        with quiet_libraries():  # offline, huggingface_hub and transformers warn and log before failing
            net = cls.from_pretrained(model, subfolder=subfolder, cache_dir=cache_dir or None)
            tokenizer = AutoTokenizer.from_pretrained(
                model, subfolder=tokenizer_subfolder or subfolder, cache_dir=cache_dir or None
            )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PluginError(
            f"cannot load CLIP text model {model!r} ({first[:160]}); offline, point text_encoder.model at a local "
            "folder written by save_pretrained"
        ) from None
    return net.eval().requires_grad_(False), tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# hash: no weights
# ---------------------------------------------------------------------------------------------------------------------
def words(prompt: str) -> list[str]:
    """Lower-cased whitespace tokens, surrounding punctuation stripped, empty ones dropped."""
    return [w for w in (t.strip(string.punctuation) for t in prompt.lower().split()) if w]


class HashTextEncoder(TextEncoder):
    """A deterministic bag of words with positions; not a language model (see the module docstring).

        e(prompt) = mean_i  v(word_i) * (1 + g_i)        (elementwise; v, g_i ~ N(0, I) seeded by hashes)

    Args:
        dim: E.
        seed: changes every vector.
        normalize: L2-normalise each embedding (a prompt without words embeds as zeros).
    """

    kind: ClassVar[str] = "hash"

    def __init__(self, dim: int = 64, *, seed: int = 0, normalize: bool = True) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        super().__init__(dim)
        self.seed = seed
        self.normalize = normalize
        self.freeze()

    def vector(self, key: str) -> torch.Tensor:
        """A fixed N(0, I) vector [E] for `key`, the same in every process and every Python run."""
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        return torch.randn(self.embedding_dim, generator=generator)

    def embed(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            tokens = words(prompt)
            if not tokens:
                rows.append(torch.zeros(self.embedding_dim))
                continue
            word_vectors = torch.stack([self.vector(f"word:{w}") for w in tokens])  # [L, E]
            mixing = 1 + torch.stack([self.vector(f"position:{i}") for i in range(len(tokens))])  # [L, E]
            rows.append((word_vectors * mixing).mean(0))
        embeddings = torch.stack(rows)  # [N, E]
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings


# ---------------------------------------------------------------------------------------------------------------------
# building from a [text_encoder] table
# ---------------------------------------------------------------------------------------------------------------------
TEXT_ENCODER_KINDS: dict[str, dict[str, Option]] = {
    "open_clip": {
        "model": Option(str, "ViT-B-32"),
        "pretrained": Option(str, "openai"),
        "normalize": Option(bool, True),
        "cache_dir": Option(str, ""),
        "random_init_seed": Option(int, -1),
    },
    "clip_transformers": {
        "model": Option(str, "openai/clip-vit-large-patch14"),
        "subfolder": Option(str, ""),
        "tokenizer_subfolder": Option(str, ""),
        "projection": Option(bool, False),
        "normalize": Option(bool, False),
        "cache_dir": Option(str, ""),
    },
    "hash": {"dim": Option(int, 64), "seed": Option(int, 0), "normalize": Option(bool, True)},
}


def resolve_text_encoder_options(options: Mapping) -> dict:
    """The `[text_encoder]` table checked and with its defaults filled in (what a resolved recipe holds)."""
    return validate_options("text_encoder", options, TEXT_ENCODER_KINDS)


def build_text_encoder(options: Mapping) -> TextEncoder:
    """The encoder a `[text_encoder]` table describes, on the CPU (move it with `.to(device)`).

    Raises:
        RecipeError: an unknown kind or key, a wrong type or value.
        PluginError: the model cannot be loaded (one line, with the offline hint).
    """
    opts = resolve_text_encoder_options(options)
    kind = opts["kind"]
    if kind == "hash":
        if opts["dim"] < 1:
            raise RecipeError(f"text_encoder.dim: must be >= 1, got {opts['dim']}")
        return HashTextEncoder(opts["dim"], seed=opts["seed"], normalize=opts["normalize"])
    if not opts["model"]:
        raise RecipeError(f"text_encoder.model: must name a model for kind {kind!r}")
    if kind == "open_clip":
        if opts["random_init_seed"] >= 0:
            net, tokenizer = random_open_clip(opts["model"], opts["pretrained"], opts["random_init_seed"])
        else:
            from rewardtune.rewards.clip import load_open_clip

            net, tokenizer = load_open_clip(
                opts["model"], opts["pretrained"], cache_dir=opts["cache_dir"], who="text_encoder"
            )
        return OpenClipTextEncoder(net, tokenizer, normalize=opts["normalize"])
    if kind == "clip_transformers":
        net, tokenizer = load_clip_text_model(
            opts["model"], subfolder=opts["subfolder"], tokenizer_subfolder=opts["tokenizer_subfolder"],
            projection=opts["projection"], cache_dir=opts["cache_dir"],
        )
        return TransformersClipTextEncoder(net, tokenizer, normalize=opts["normalize"])
    raise AssertionError(f"unhandled text encoder kind {kind!r}")  # validate_options admits only the kinds above


def random_open_clip(model: str, pretrained: str, seed: int):
    """A frozen open_clip model of architecture `model` with random weights drawn at `seed` (needs no download): the
    tokenizer and transformer of a real text tower, for offline benchmarks ("a frozen random text encoder"), not a
    language model that knows what words mean.

    Raises:
        RecipeError: `pretrained` is also set, or `model` is not an open_clip architecture name.
    """
    import open_clip

    if pretrained:
        raise RecipeError("text_encoder.random_init_seed draws random weights: set pretrained = \"\"")
    if model not in open_clip.list_models():
        raise RecipeError(f"text_encoder.model: {model!r} is not an open_clip architecture (open_clip.list_models())")
    with torch.random.fork_rng(), quiet_libraries():
        torch.manual_seed(seed)
        net = open_clip.create_model(model, pretrained=None)
    return net.eval().requires_grad_(False), open_clip.get_tokenizer(model)
