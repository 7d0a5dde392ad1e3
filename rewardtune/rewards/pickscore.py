"""Reward `pickscore`: PickScore (Kirstain et al., 2023), a CLIP ViT-H/14 fine-tuned on human preferences between
images of a prompt (Pick-a-Pic); the reward Flow-GRPO and DiffusionNFT tune SD 3.5 for.

    r(x, c) = scale * exp(logit_scale) * cos(image_embed(preprocess(x)), text_embed(prompt c))

with transformers' `CLIPModel` (`model`, default "yuvalkirstain/PickScore_v1") and the tokenizer and image statistics
of `processor` (default "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", as PickScore's authors use). Each sample is scored
against its own prompt in a conditional run (the context's prompts); without a context, against `prompts`
(averaged). The preprocessing is torch, so the score is differentiable in the pixels: [-1, 1] -> [0, 1] -> resize the
shorter side to the model's image size (bicubic, antialiased) and centre crop -> the processor's mean/std.

Offline, `model` and `processor` take local folders (`save_pretrained` of the model, and of the processor or its
tokenizer and image processor); a model that cannot be loaded is a one-line `PluginError`. The network is frozen and
left out of checkpoints.
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
from rewardtune.rewards.clip import check_image_shape, resize_crop


class PickScoreReward(Reward):
    """PickScore of images [B, C, H, W] in [-1, 1] under their prompts: [B] (see the module docstring).

    Args:
        model: a transformers `CLIPModel`.
        tokenizer: its tokenizer.
        image_mean, image_std: the processor's per-channel statistics.
        image_size: the vision tower's input size.
        prompts: the prompts of an unconditional run (averaged over).
        scale: multiplies the score.
    """

    name: ClassVar[str] = "pickscore"
    differentiable: ClassVar[bool] = True
    learns: ClassVar[bool] = False

    def __init__(
        self, model: nn.Module, tokenizer, image_mean: Sequence[float], image_std: Sequence[float], image_size: int,
        *, prompts: Sequence[str] = (), scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        keep_out_of_checkpoints(self, "model")
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.prompts = tuple(prompts)
        self.scale = scale
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.cache: dict[str, torch.Tensor] = {}

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images [B, C, H, W] -> the model's normalised input [B, 3, S, S]."""
        x = (x.to(self.mean.dtype) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = resize_crop(x, (self.image_size, self.image_size), mode="shortest", interpolation="bicubic", fill=0.0)
        return (x - self.mean) / self.std

    def image_embeds(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=self.preprocess(x)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)  # [B, E]

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm prompt embeddings [P, E], each prompt encoded once."""
        new = sorted({p for p in prompts if p not in self.cache})
        if new:
            device = self.mean.device
            tokens = self.tokenizer(new, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                                    return_tensors="pt")
            pooled = self.model.text_model(input_ids=tokens.input_ids.to(device),
                                           attention_mask=tokens.attention_mask.to(device)).pooler_output
            embeds = F.normalize(self.model.text_projection(pooled).float(), dim=-1)
            self.cache.update(zip(new, embeds.cpu()))
        return torch.stack([self.cache[p] for p in prompts]).to(self.mean.device)

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        image = self.image_embeds(x)  # [B, E]
        logit_scale = float(self.model.logit_scale.exp())
        if context is None:
            if not self.prompts:
                raise ValueError("pickscore needs prompts: a [conditions] prompt source, or the prompts option")
            return self.scale * logit_scale * (image @ self.text_embeds(self.prompts).T).mean(1)
        if not isinstance(context, Conditions) or context.prompts is None:
            raise ValueError("pickscore scores samples against prompts; the conditions hold none (class labels?)")
        return self.scale * logit_scale * (image * self.text_embeds(context.prompts)).sum(1)


def build_pickscore_reward(
    sample_shape: tuple[int, ...],
    /,
    *,
    model: str = "yuvalkirstain/PickScore_v1",
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    prompts: tuple[str, ...] = (),
    scale: float = 1.0,
    cache_dir: str = "",
) -> PickScoreReward:
    """Reward `pickscore`: transformers' CLIPModel `model` with `processor`'s tokenizer and image statistics (hub ids
    or local folders); `prompts` for an unconditional run; `scale` multiplies the score."""
    check_image_shape(sample_shape, "pickscore")
    try:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
    except ImportError:
        raise PluginError("reward 'pickscore' needs transformers: pip install 'rewardtune[latent]'") from None
    try:
        with quiet_libraries():
            net = CLIPModel.from_pretrained(model, cache_dir=cache_dir or None)
            tokenizer = AutoTokenizer.from_pretrained(processor, cache_dir=cache_dir or None)
            images = CLIPImageProcessor.from_pretrained(processor, cache_dir=cache_dir or None)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PluginError(
            f"pickscore: cannot load {model!r} with processor {processor!r} ({first[:160]}); offline, point "
            "reward.model and reward.processor at local folders written by save_pretrained"
        ) from None
    return PickScoreReward(net, tokenizer, images.image_mean, images.image_std, net.config.vision_config.image_size,
                           prompts=prompts, scale=scale)
