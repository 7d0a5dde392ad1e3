"""Backbone `flux`: a FLUX.1-class latent flow-matching transformer as a T-step Gaussian policy in latent space.

Components (diffusers / transformers), loaded with `FluxPipeline.from_pretrained` from a hub id or a local folder: a
`FluxTransformer2DModel` velocity network, an `AutoencoderKL` (16 latent channels, with scaling and shift factors), a
CLIP text model (its pooled output) and a T5 encoder (its token states). What differs from `sd3` (backbones/sd3.py),
whose policy this one extends:

- **Packed latents.** The transformer takes the latents [B, C, h, w] as a sequence of 2x2 patches [B, hw/4, 4C]
  with a (0, row, column) position id per patch, and the prompt's T5 tokens with zero ids (FluxPipeline's layout).
  The policy's state stays the unpacked latent, so the value, the flow SDE and the decode see [B, C, h, w];
  `pack_latents` / `unpack_latents` convert at each network call.
- **Timestep and guidance in [0, 1] units.** The transformer is called with the level s itself (it scales by 1000
  inside), and FLUX.1-dev's distilled guidance is an input, `guidance_scale` (3.5 by default for a transformer with
  `guidance_embeds`; none for FLUX.1-schnell). Classifier-free guidance with the empty prompt (`cfg_scale`) stays
  available but is off by default (FLUX.1 is not trained for it).
- **Resolution-dependent shift.** FLUX's scheduler shifts its levels by exp(mu), mu linear in the number of image
  patches (`use_dynamic_shifting`; diffusers' `calculate_shift`); this is the SD3 shift s' = k s / (1 + (k - 1) s)
  with k = exp(mu), so `FlowChainPolicy`'s levels take `shift = exp(mu)` for the run's image size.

The policy is `FlowChainPolicy` on the latents (backbones/flow.py: the flow SDE with learnable sigma_t), LoRA adapters
(peft) on the transformer's attention projections as for `sd`/`sd3`: only they train and only they are checkpointed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from rewardtune.backbones.flow import TIMESTEP_SCALE
from rewardtune.backbones.latent import (
    check_latent_options,
    latent_shape_of,
    load_component,
    prepare_network,
)
from rewardtune.backbones.sd3 import LatentFlowPolicy, PipelinePromptStates
from rewardtune.nets.conditioning import Conditioning


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] (h, w even) -> the sequence of their 2x2 patches [B, (h/2)(w/2), 4C], row-major, each
    patch's features ordered (channel, row in patch, column in patch) as FluxPipeline packs them."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents`: [B, (h/2)(w/2), 4C] -> [B, C, h, w]."""
    b, _, features = packed.shape
    c = features // 4
    return packed.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def latent_position_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The (0, row, column) id [(h/2)(w/2), 3] of each packed patch of [C, h, w] latents (FluxPipeline's)."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)[:, None].expand(height // 2, width // 2)
    columns = torch.arange(width // 2, device=device, dtype=dtype)[None, :].expand(height // 2, width // 2)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)


class FluxPromptStates(PipelinePromptStates):
    """A FLUX pipeline's prompt states: T5's token states [N, L, D] and CLIP-L's pooled output [N, P].

    Args:
        pipeline: a `FluxPipeline`.
        max_sequence_length: T5's token length (512 for FLUX.1-dev, 256 for schnell).
    """

    def __init__(self, pipeline, max_sequence_length: int = 512) -> None:
        super().__init__(pipeline, ("text_encoder", "text_encoder_2"), max_sequence_length)

    def encode(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled, _ = self.pipeline[0].encode_prompt(prompts, None, device=device,
                                                           max_sequence_length=self.max_sequence_length)
        return states, pooled


class FluxPolicy(LatentFlowPolicy):
    """`LatentFlowPolicy` with a FLUX transformer (see the module docstring).

    Args:
        transformer: a `FluxTransformer2DModel` (in_channels = 4 x the latent channels).
        vae, prompt_states (`FluxPromptStates`), latent_shape (C, h, w), decode_checkpointing: as `LatentFlowPolicy`.
        guidance_scale: the distilled guidance input of a transformer with `guidance_embeds` (None without).
        **kwargs: passed to `FlowChainPolicy` (num_steps, shift, noise_level, conditioning, cfg_scale, learn_sigma,
            fix_last_sigma, sigma_floor).
    """

    def __init__(self, transformer: nn.Module, vae: nn.Module, prompt_states: FluxPromptStates,
                 latent_shape: tuple[int, int, int], *, guidance_scale: float | None = None, **kwargs) -> None:
        super().__init__(transformer, vae, prompt_states, latent_shape, **kwargs)
        self.guidance_scale = guidance_scale

    def velocity(self, x: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """v(z, s, c) [B, C, h, w] for latents x [B, C, h, w] at timesteps 1000 s [B] (`predict_velocity`'s unit)."""
        height, width = x.shape[-2:]
        guidance = None
        if self.guidance_scale is not None:
            guidance = torch.full((x.shape[0],), float(self.guidance_scale), device=x.device, dtype=x.dtype)
        out = self.velocity_net(
            hidden_states=pack_latents(x), timestep=timestep / TIMESTEP_SCALE, guidance=guidance,
            pooled_projections=pooled.to(x.dtype), encoder_hidden_states=states.to(x.dtype),
            txt_ids=torch.zeros(states.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=latent_position_ids(height, width, x.device, x.dtype),
        ).sample
        return unpack_latents(out, height, width)


def flux_shift(scheduler_config, latent_shape: tuple[int, int, int]) -> float:
    """The level shift k of FLUX's scheduler for latents of `latent_shape`: exp(mu) with diffusers' `calculate_shift`
    of the number of packed patches when the scheduler shifts dynamically, else its `shift`."""
    config = dict(scheduler_config)
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    patches = (latent_shape[1] // 2) * (latent_shape[2] // 2)
    mu = calculate_shift(patches, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    return math.exp(mu)


def load_flux_pipeline(pretrained: str):
    """`FluxPipeline.from_pretrained`, with a one-line PluginError when it cannot be had."""
    index = Path(pretrained) / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") not in (None, "FluxPipeline"):
        raise ValueError(f"{pretrained} holds a {json.loads(index.read_text())['_class_name']}, not a FluxPipeline")
    return load_component("diffusers:FluxPipeline", pretrained, None, "FLUX pipeline")


def build_flux_backbone(
    sample_shape: tuple[int, ...],
    conditioning: Conditioning | None = None,
    /,
    *,
    pretrained: str = "black-forest-labs/FLUX.1-dev",
    num_steps: int = 10,
    shift: float | None = None,
    noise_level: float = 0.7,
    cfg_scale: float = 1.0,
    guidance_scale: float | None = None,
    max_sequence_length: int = 512,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_targets: list[str] | None = None,
    gradient_checkpointing: bool = False,
    decode_checkpointing: bool = True,
    learn_sigma: bool = True,
    fix_last_sigma: bool = False,
    sigma_floor: float = 1e-3,
) -> FluxPolicy:
    """A FLUX.1-class pipeline as a T-step flow-SDE policy on its latents; see the module docstring.

    `pretrained` is a hub id (FLUX.1-dev needs its license accepted on the hub) or a folder written by
    `FluxPipeline.save_pretrained`. `shift` defaults to the pipeline scheduler's for this image size (`flux_shift`);
    `guidance_scale` to 3.5 for a transformer with guidance embeddings (FLUX.1-dev) and None without (schnell);
    `cfg_scale` (true classifier-free guidance with the empty prompt, two transformer calls a step) to 1.

    Raises:
        PluginError: a pipeline that cannot be loaded (offline: one line naming backbone.pretrained).
        ValueError: class-label conditions, non-RGB data, an image size the VAE and the 2x2 packing do not divide,
            a guidance_scale for a transformer without guidance embeddings, a bad LoRA setting.
    """
    check_latent_options("flux", sample_shape, conditioning, lora_rank, lora_alpha, lora_targets)
    pipeline = load_flux_pipeline(pretrained)
    transformer, vae = pipeline.transformer, pipeline.vae
    latent_shape = latent_shape_of(sample_shape, vae, int(transformer.config.in_channels) // 4, 2)
    has_guidance = bool(transformer.config.guidance_embeds)
    if guidance_scale is not None and not has_guidance:
        raise ValueError("guidance_scale is FLUX.1-dev's distilled guidance input; this transformer has no guidance "
                         "embeddings (FLUX.1-schnell): leave it unset, or use cfg_scale")
    if shift is None:
        shift = flux_shift(pipeline.scheduler.config, latent_shape) if pipeline.scheduler is not None else 1.0
    prepare_network(transformer, lora_rank, lora_alpha, lora_targets, gradient_checkpointing)
    return FluxPolicy(
        transformer,
        vae,
        FluxPromptStates(pipeline, max_sequence_length),
        latent_shape,
        guidance_scale=(guidance_scale if guidance_scale is not None else 3.5) if has_guidance else None,
        decode_checkpointing=decode_checkpointing,
        num_steps=num_steps,
        shift=shift,
        noise_level=noise_level,
        conditioning=conditioning,
        cfg_scale=cfg_scale,
        learn_sigma=learn_sigma,
        fix_last_sigma=fix_last_sigma,
        sigma_floor=sigma_floor,
    )
