"""Backbone `ddpm`: a diffusers `UNet2DModel` eps-prediction network run as a T-step Gaussian policy.

The UNet is loaded with `UNet2DModel.from_pretrained` (a hub id such as the default google/ddpm-cifar10-32, or a
local folder written by `save_pretrained`), or built at random from a `unet` config table (for pretraining a small
UNet, e.g. on the 8x8 digits). The policy runs it on a few-step sub-schedule of the 1000-step DDPM (FastDPM's VAR
schedule, as DxMI's CIFAR-10 runs, or a plain strided one); see `EpsilonChainPolicy`.

Conditional (a [conditions] table): the condition's embedding (`ConditionEmbedding`, zero at initialisation) is added to
the UNet's time embedding through diffusers' class-embedding slot (`class_embedding` = identity, `class_labels` =
the embedding), for class labels and pooled text embeddings alike; a pretrained unconditional UNet so starts out
computing exactly what it computed before. `cfg_scale` is the policy's classifier-free guidance scale.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rewardtune.backbones.base import IMAGE_RANGE
from rewardtune.backbones.epsilon import EpsilonChainPolicy
from rewardtune.errors import PluginError
from rewardtune.nets.conditioning import ConditionEmbedding, Conditioning
from rewardtune.quiet import quiet_libraries


class UNetEps(nn.Module):
    """eps(x, k, c) = unet(x, k, class_labels=emb(c)).sample for a diffusers UNet2DModel (k: DDPM timesteps [B],
    possibly fractional; c: the condition tensor, None for "no condition"; unconditional: unet(x, k).sample)."""

    def __init__(self, unet: nn.Module, conditioning: Conditioning | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.condition = None
        if conditioning is not None:
            if unet.class_embedding is not None:
                raise ValueError("the UNet has its own class embedding; drop class_embed_type / num_class_embeds and "
                                 "let [conditions] condition it")
            self.condition = ConditionEmbedding(conditioning, unet.time_embedding.linear_2.out_features, zero_init=True)
            unet.class_embedding = nn.Identity()  # UNet2DModel adds class_embedding(class_labels) to its time embedding

    def forward(self, x: torch.Tensor, k: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.condition is None:
            if c is not None:
                raise ValueError("this UNet is unconditional but was given a condition")
            return self.unet(x, k).sample
        return self.unet(x, k, class_labels=self.condition(c, x.shape[0], x.device)).sample


def load_unet(pretrained: str, subfolder: str | None = None) -> nn.Module:
    """`UNet2DModel.from_pretrained` with a one-line error when the weights cannot be had (offline, bad path)."""
    from diffusers import UNet2DModel

    try:
        with quiet_libraries():  # offline, huggingface_hub and diffusers warn and log before failing
            return UNet2DModel.from_pretrained(pretrained, subfolder=subfolder)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PluginError(
            f"cannot load UNet2DModel {pretrained!r} ({first[:160]}); offline, point backbone.pretrained at a local "
            "folder written by save_pretrained"
        ) from None


def check_image_shape(model: nn.Module, sample_shape: tuple[int, ...]) -> None:
    """A ValueError unless the UNet's images (its config's in_channels and sample_size) have the data's shape."""
    channels, size = model.config.in_channels, model.config.sample_size
    size = size if isinstance(size, int) else size[0]
    if tuple(sample_shape) != (channels, size, size):
        raise ValueError(f"the UNet makes {channels}x{size}x{size} images but the data are {'x'.join(map(str, sample_shape))}")


def build_ddpm_backbone(
    sample_shape: tuple[int, ...],
    conditioning: Conditioning | None = None,
    /,
    *,
    pretrained: str = "google/ddpm-cifar10-32",
    subfolder: str = "",
    unet: dict | None = None,
    num_steps: int = 10,
    schedule: Literal["strided", "fastdpm"] = "fastdpm",
    num_train_steps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    learn_sigma: bool = True,
    fix_last_sigma: bool = True,
    sigma_floor: float = 1e-3,
    prediction: Literal["epsilon", "sample"] = "epsilon",
    cfg_scale: float = 1.0,
) -> EpsilonChainPolicy:
    """A pretrained (or, with `unet` and pretrained = "", randomly initialised) DDPM UNet as a T-step policy.

    `unet` is a UNet2DModel config (its constructor arguments) for a random network; it excludes `pretrained`.
    The sample (`output`) is x_T clamped to the data's pixel range [-1, 1].
    """
    if unet is not None and pretrained:
        raise ValueError("set either pretrained (load weights) or unet (random init, with pretrained = \"\"), not both")
    if unet is None and not pretrained:
        raise ValueError("pretrained = \"\" needs a unet config table for a randomly initialised network")
    if unet is not None:
        from diffusers import UNet2DModel

        model = UNet2DModel(**unet)
    else:
        model = load_unet(pretrained, subfolder or None)
    check_image_shape(model, sample_shape)
    return EpsilonChainPolicy(
        UNetEps(model, conditioning),
        tuple(sample_shape),
        num_steps=num_steps,
        schedule=schedule,
        num_train_steps=num_train_steps,
        beta_start=beta_start,
        beta_end=beta_end,
        learn_sigma=learn_sigma,
        fix_last_sigma=fix_last_sigma,
        sigma_floor=sigma_floor,
        prediction=prediction,
        output_range=IMAGE_RANGE,
        conditioning=conditioning,
        cfg_scale=cfg_scale,
    )
