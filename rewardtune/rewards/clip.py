"""Reward `clip`: the cosine similarity of an image to text prompts under an open_clip model (Radford et al., 2021).

    r(x) = scale * cos(f_image(preprocess(x)), f_text(prompt))

averaged over the prompts, or against one prompt per sample given as context. The preprocessing is done in torch and
is differentiable, so the gradient reaches the pixels (`terminal = "reward"` works): images in [-1, 1] -> [0, 1] ->
resize (bicubic, antialiased) and centre crop to the model's input size (open_clip's `resize_mode`) -> the model's
mean/std. Grey images (C = 1) are repeated to RGB. The text features are computed once.

Weights come from open_clip: a model name and a `pretrained` tag (downloaded into the Hugging Face cache), or
`model = "local-dir:/path"`, a folder holding `open_clip_config.json` and the weights (offline use). A model that
cannot be loaded is a one-line `PluginError`. The network is frozen and left out of checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.conditions import Conditions
from rewardtune.errors import PluginError
from rewardtune.quiet import quiet_libraries
from rewardtune.rewards.base import Reward, keep_out_of_checkpoints

OFFLINE_HINT = "offline, point model at \"local-dir:/path\" (a folder with open_clip_config.json and the weights)"


def load_open_clip(model: str, pretrained: str, *, cache_dir: str = "", who: str = "clip"):
    """(frozen open_clip model in eval mode, its tokenizer), or a one-line PluginError.

    `pretrained` (a tag or a file) is used only for a plain model name; "local-dir:" and "hf-hub:" names carry
    their own weights (and their config). Loading without weights is refused (`require_pretrained`): a random CLIP
    is no reward. A tag trained with QuickGELU (all "openai" ones) gets it: open_clip only warns about the mismatch.
    """
    import open_clip

    has_schema = model.startswith(("local-dir:", "hf-hub:"))
    tag = {} if has_schema or not pretrained else open_clip.get_pretrained_cfg(model, pretrained)
    try:
        with quiet_libraries():  # offline, open_clip and huggingface_hub log and warn before failing
            net = open_clip.create_model(
                model, pretrained=None if has_schema else (pretrained or None), require_pretrained=True,
                cache_dir=cache_dir or None, force_quick_gelu=bool(tag.get("quick_gelu", False)),
            )
            tokenizer = open_clip.get_tokenizer(model, cache_dir=cache_dir or None)
    except Exception as err:  # noqa: BLE001 (RuntimeError (download), FileNotFoundError, ValueError (config) and friends)
        lines = str(err).strip().splitlines()
        reason = lines[0][:200] if lines else type(err).__name__
        source = model if has_schema else f"{model} (pretrained {pretrained!r})"
        raise PluginError(f"{who}: cannot load open_clip model {source}: {reason}; {OFFLINE_HINT}") from None
    return net.eval().requires_grad_(False), tokenizer


def resize_crop(x: torch.Tensor, size: tuple[int, int], *, mode: str, interpolation: str, fill: float) -> torch.Tensor:
    """Differentiable open_clip geometry: resize (keeping the aspect ratio, or squashing) then centre crop or pad.

    Args:
        x: images [B, C, H, W].
        size: the model's input size (height, width).
        mode: open_clip's `resize_mode`: "shortest" (shortest side to size, then crop), "longest" (longest side to
            size, then pad with `fill`) or "squash" (resize to size).
        interpolation: "bicubic", "bilinear" or "nearest".
        fill: the padding value (pixels in [0, 1]).
    Returns:
        [B, C, size[0], size[1]].
    """
    h, w = x.shape[-2:]
    th, tw = size
    if mode == "squash":
        new = (th, tw)
    elif mode in ("shortest", "longest"):
        ratio = (max if mode == "longest" else min)(h / th, w / tw)
        new = (round(h / ratio), round(w / ratio))
    else:
        raise ValueError(f"unknown open_clip resize_mode {mode!r}")
    if new != (h, w):
        smooth = interpolation in ("bicubic", "bilinear")
        x = F.interpolate(x, size=new, mode=interpolation, antialias=smooth, align_corners=False if smooth else None)
    # centre crop (negative offsets pad), with torchvision's rounding of the offsets
    top, left = round((new[0] - th) / 2.0), round((new[1] - tw) / 2.0)
    if top < 0 or left < 0:
        pad_top, pad_left = max(-top, 0), max(-left, 0)
        pad = (pad_left, max(tw - new[1] - pad_left, 0), pad_top, max(th - new[0] - pad_top, 0))
        x = F.pad(x, pad, value=fill)
        top, left = max(top, 0), max(left, 0)
    return x[..., top : top + th, left : left + tw]


class ClipImageEncoder(nn.Module):
    """Images in [-1, 1] [B, C, H, W] (C = 1 or 3) -> CLIP image embeddings [B, E] (not normalised), differentiably.

    Args:
        model: an open_clip model (its `visual.preprocess_cfg` gives size, mean, std, interpolation, resize mode).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.fill = float(cfg.get("fill_color", 0)) / 255.0
        mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)  # [1, 3, 1, 1]
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)  # [1, 3, 1, 1]

    @property
    def embed_dim(self) -> int:
        dim = getattr(self.model.visual, "output_dim", None)
        if dim:
            return int(dim)
        with torch.no_grad():  # towers without `output_dim`: measure it
            return int(self.model.encode_image(torch.zeros(1, 3, *self.size, device=self.mean.device)).shape[-1])

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the model's normalised input [B, 3, h, w]."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"CLIP needs images B x C x H x W with C = 1 or 3, got shape {tuple(x.shape)}")
        x = (x.to(self.mean.dtype) + 1) / 2  # [B, C, H, W] in [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = resize_crop(x, self.size, mode=self.resize_mode, interpolation=self.interpolation, fill=self.fill)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.preprocess(x))


class ClipReward(Reward):
    """r(x) = scale * cos(image embedding, prompt embedding).

    Args:
        model: an open_clip model.
        tokenizer: its tokenizer (prompts -> token ids).
        prompts: one or more prompts.
        scale: multiplies the cosine similarity.

    `forward(x, context)`: context None averages the similarity over the prompts; a LongTensor [B] picks one of
    `prompts` per sample; a sequence of B strings gives each sample its own prompt.
    """

    name: ClassVar[str] = "clip"
    differentiable: ClassVar[bool] = True
    learns: ClassVar[bool] = False

    def __init__(self, model: nn.Module, tokenizer, prompts: Sequence[str], *, scale: float = 1.0) -> None:
        super().__init__()
        if isinstance(prompts, str) or not prompts:
            raise ValueError("clip needs a non-empty list of prompts")
        self.encoder = ClipImageEncoder(model)
        keep_out_of_checkpoints(self, "encoder")
        self.tokenizer = tokenizer
        self.prompts = tuple(prompts)
        self.scale = scale
        self.register_buffer("text_features", self.encode_text(self.prompts), persistent=False)  # [P, E], unit norm

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings [P, E]."""
        device = self.encoder.mean.device
        return F.normalize(self.encoder.model.encode_text(self.tokenizer(list(prompts)).to(device)).float(), dim=-1)

    def prompt_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings [B, E] of per-sample prompts, each prompt encoded once per reward (a run's
        prompt set is finite)."""
        cache = self.__dict__.setdefault("_prompt_cache", {})
        new = sorted({p for p in prompts if p not in cache})
        if new:
            cache.update(zip(new, self.encode_text(new).cpu()))
        return torch.stack([cache[p] for p in prompts])

    def text_for(self, context, batch_size: int) -> torch.Tensor:
        """Text embeddings [P, E] shared by the batch (context None) or [B, E], one per sample (context: the
        samples' `Conditions` with prompts, a LongTensor of indices into `prompts`, or B strings)."""
        if context is None:
            return self.text_features
        if isinstance(context, Conditions):  # a conditional run: each sample against its own prompt
            if context.prompts is None:
                raise ValueError("clip: the conditions hold class labels, not prompts")
            return self.prompt_features(context.prompts)
        if isinstance(context, torch.Tensor) and not context.dtype.is_floating_point and context.shape == (batch_size,):
            return self.text_features[context.long()]
        if (
            isinstance(context, Sequence) and not isinstance(context, str) and len(context) == batch_size
            and all(isinstance(c, str) for c in context)
        ):
            return self.encode_text(context)
        raise ValueError(
            f"clip: context must be None, a LongTensor of {batch_size} prompt indices or {batch_size} strings"
        )

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        image = F.normalize(self.encoder(x).float(), dim=-1)  # [B, E]
        text = self.text_for(context, x.shape[0]).to(image.device)
        if context is None:
            similarity = (image @ text.T).mean(1)  # [B], mean over the prompts
        else:
            similarity = (image * text).sum(1)  # [B], each sample against its own prompt
        return self.scale * similarity


def build_clip_reward(
    sample_shape: tuple[int, ...],
    /,
    *,
    model: str = "ViT-B-32",
    pretrained: str = "openai",
    prompts: tuple[str, ...] = ("a high quality photograph",),
    scale: float = 1.0,
    cache_dir: str = "",
) -> ClipReward:
    """Reward `clip`: open_clip `model` with `pretrained` weights (or "local-dir:/path"), cosine to `prompts` x scale.

    `cache_dir` is where downloaded weights go ("" is the Hugging Face default cache).
    """
    check_image_shape(sample_shape, "clip")
    net, tokenizer = load_open_clip(model, pretrained, cache_dir=cache_dir, who="clip")
    return ClipReward(net, tokenizer, prompts, scale=scale)


def check_image_shape(sample_shape: tuple[int, ...], who: str) -> None:
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
        raise ValueError(f"reward {who!r} needs images (C, H, W) with C = 1 or 3, got sample shape {tuple(sample_shape)}")
