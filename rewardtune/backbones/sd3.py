"""Backbone `sd3`: a latent flow-matching text-to-image transformer (Stable Diffusion 3 class) as a T-step Gaussian
policy in latent space.

Components (diffusers / transformers): an `SD3Transformer2DModel` velocity network, an `AutoencoderKL` (16 latent
channels for SD3, with its scaling and shift factors), and the pipeline's text encoders: two CLIP text models with
projection and, optionally, T5 (a pipeline saved without `text_encoder_3` runs without it, as diffusers allows).
Everything loads with `StableDiffusion3Pipeline.from_pretrained` from a hub id or a local folder; the level shift is
the pipeline scheduler's (`FlowMatchEulerDiscreteScheduler`'s `shift`, 3.0 for SD3).

The policy is `FlowChainPolicy` on the latents (backbones/flow.py: the flow SDE's Gaussian steps with learnable
sigma_t, as Flow-GRPO samples). The prompt's token states and pooled embedding come from the pipeline's own
`encode_prompt` (CLIP penultimate states of both encoders side by side, zero-padded to the transformer's width,
then T5's; the two pooled projections concatenated), computed once per prompt and cached. Classifier-free guidance
uses the empty prompt as the unconditional branch, v_u + w (v_c - v_u). The sample is the decoded image in
[-1, 1] (`latent.LatentOutput`), and LoRA adapters (peft) on the transformer's attention projections work as for
`sd`: only they train and only they are checkpointed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rewardtune.backbones.flow import TIMESTEP_SCALE, FlowChainPolicy
from rewardtune.backbones.latent import (
    LatentOutput,
    chain_prompts,
    check_latent_options,
    latent_shape_of,
    load_component,
    prepare_network,
)
from rewardtune.conditions import Conditions
from rewardtune.nets.conditioning import Conditioning, classifier_free_guidance
from rewardtune.nets.frozen import keep_out_of_checkpoints


class PipelinePromptStates(nn.Module):
    """Prompts -> (token states [N, L, D], pooled embeddings [N, P]) of a pipeline's frozen text encoders, through
    the pipeline's own `encode_prompt` (`encode`, per subclass), cached per prompt.

    Args:
        pipeline: the diffusers pipeline holding the text encoders and tokenizers (not a submodule: its
            transformer is the policy's network).
        encoder_names: the pipeline attributes that hold its text encoders (absent ones skipped).
        max_sequence_length: T5's token length.
    """

    def __init__(self, pipeline, encoder_names: Sequence[str], max_sequence_length: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({name: getattr(pipeline, name).eval().requires_grad_(False)
                                       for name in encoder_names if getattr(pipeline, name, None) is not None})
        self.pipeline = [pipeline]
        self.max_sequence_length = max_sequence_length
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        keep_out_of_checkpoints(self, "encoders")

    def train(self, mode: bool = True) -> PipelinePromptStates:
        return super().train(False)  # frozen: always in eval mode

    def encode(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [N, L, D], pooled [N, P]) of `prompts` from the pipeline's `encode_prompt`."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.encoders.parameters()).device
        new = sorted({p for p in prompts if p not in self.cache})
        if new:
            states, pooled = self.encode(new, device)
            for prompt, state, pool in zip(new, states, pooled):
                self.cache[prompt] = (state.float().cpu(), pool.float().cpu())
        states = torch.stack([self.cache[p][0] for p in prompts]).to(device)
        pooled = torch.stack([self.cache[p][1] for p in prompts]).to(device)
        return states, pooled


class SD3PromptStates(PipelinePromptStates):
    """An SD3 pipeline's prompt states: CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width,
    then T5's (zeros without T5); the two pooled projections concatenated.

    Args:
        pipeline: a `StableDiffusion3Pipeline` (its config sizes the T5 stand-in when T5 is absent).
        max_sequence_length: T5's token length (256 for SD3).
    """

    def __init__(self, pipeline, max_sequence_length: int = 256) -> None:
        super().__init__(pipeline, ("text_encoder", "text_encoder_2", "text_encoder_3"), max_sequence_length)

    def encode(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        states, _, pooled, _ = self.pipeline[0].encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return states, pooled


class LatentFlowPolicy(LatentOutput, FlowChainPolicy):
    """`FlowChainPolicy` on the latents of `vae` with a text-conditioned SD3 transformer (see the module docstring).

    Args:
        transformer: an `SD3Transformer2DModel`, called as transformer(hidden_states=z, timestep=1000 s,
            encoder_hidden_states=states, pooled_projections=pooled).sample.
        vae: a diffusers `AutoencoderKL`.
        prompt_states: the frozen text encoders (`SD3PromptStates`).
        latent_shape: (C, h, w) of the latents.
        decode_checkpointing: checkpoint the decode under gradients.
        **kwargs: passed to `FlowChainPolicy` (num_steps, shift, noise_level, conditioning, cfg_scale, learn_sigma,
            fix_last_sigma, sigma_floor).
    """

    network_name = "velocity_net"

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        prompt_states: SD3PromptStates,
        latent_shape: tuple[int, int, int],
        *,
        decode_checkpointing: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(transformer, latent_shape, **kwargs)
        self.init_latent(vae, prompt_states, decode_checkpointing)

    def velocity(self, x: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.velocity_net(hidden_states=x, timestep=timestep, encoder_hidden_states=states.to(x.dtype),
                                 pooled_projections=pooled.to(x.dtype)).sample

    def predict_velocity(
        self, x: torch.Tensor, s: torch.Tensor, condition: Conditions | None = None, *, cfg_scale: float | None = None
    ) -> torch.Tensor:
        """v_theta(z, s, c) [B, C, h, w] for levels s [B], guided at `cfg_scale` (default: the policy's) with the
        empty prompt as the unconditional branch."""
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        timestep = TIMESTEP_SCALE * s
        states, pooled = self.prompt_states(chain_prompts(condition, x.shape[0]))
        if scale == 1.0:
            return self.velocity(x, timestep, states, pooled)
        null_states, null_pooled = self.prompt_states([""] * x.shape[0])
        both = self.velocity(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([states, null_states]),
                             torch.cat([pooled, null_pooled]))
        conditional, unconditional = both.chunk(2)
        return classifier_free_guidance(conditional, unconditional, scale)


def load_sd3_pipeline(pretrained: str, use_t5: bool = True):
    """`StableDiffusion3Pipeline.from_pretrained` (without T5 when `use_t5` is false, as diffusers documents for
    saving memory), with a one-line PluginError when it cannot be had."""
    index = Path(pretrained) / "model_index.json"
    if use_t5 and index.is_file() and json.loads(index.read_text()).get("text_encoder_3", [None])[0] is None:
        raise ValueError(f"the pipeline at {pretrained} has no T5 (text_encoder_3); set backbone.use_t5 = false")
    without_t5 = {} if use_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    return load_component("diffusers:StableDiffusion3Pipeline", pretrained, None,
                          "SD3 pipeline" + ("" if use_t5 else " (without T5)"), **without_t5)


def build_sd3_backbone(
    sample_shape: tuple[int, ...],
    conditioning: Conditioning | None = None,
    /,
    *,
    pretrained: str = "stabilityai/stable-diffusion-3.5-medium",
    num_steps: int = 10,
    shift: float | None = None,
    noise_level: float = 0.7,
    cfg_scale: float | None = None,
    use_t5: bool = True,
    max_sequence_length: int = 256,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_targets: list[str] | None = None,
    gradient_checkpointing: bool = False,
    decode_checkpointing: bool = True,
    learn_sigma: bool = True,
    fix_last_sigma: bool = False,
    sigma_floor: float = 1e-3,
) -> LatentFlowPolicy:
    """An SD3-class pipeline as a T-step flow-SDE policy on its latents; see the module docstring.

    `pretrained` is a hub id (SD3.5 needs the license accepted on the hub) or a folder written by
    `StableDiffusion3Pipeline.save_pretrained`. `use_t5 = false` loads it without T5 (its states are then zeros, as
    diffusers does; T5-XXL is most of SD3's text-encoder memory, and a pipeline saved without it needs this).
    `shift` defaults to the pipeline scheduler's; `cfg_scale` to 4.5
    (Flow-GRPO's) with [conditions] and 1 without. The image size is the data's; the latents are (transformer
    in_channels, H / f, W / f), f the VAE's downsampling.

    Raises:
        PluginError: a pipeline that cannot be loaded (offline: one line naming backbone.pretrained).
        ValueError: class-label conditions, non-RGB data, an image size the VAE and patches do not divide, a bad LoRA
            setting.
    """
    check_latent_options("sd3", sample_shape, conditioning, lora_rank, lora_alpha, lora_targets)
    pipeline = load_sd3_pipeline(pretrained, use_t5)
    transformer, vae = pipeline.transformer, pipeline.vae
    latent_shape = latent_shape_of(sample_shape, vae, int(transformer.config.in_channels),
                                   int(transformer.config.patch_size))
    if shift is None:
        shift = float(getattr(pipeline.scheduler.config, "shift", 1.0)) if pipeline.scheduler is not None else 1.0
    prepare_network(transformer, lora_rank, lora_alpha, lora_targets, gradient_checkpointing)
    return LatentFlowPolicy(
        transformer,
        vae,
        SD3PromptStates(pipeline, max_sequence_length),
        latent_shape,
        decode_checkpointing=decode_checkpointing,
        num_steps=num_steps,
        shift=shift,
        noise_level=noise_level,
        conditioning=conditioning,
        cfg_scale=cfg_scale if cfg_scale is not None else (4.5 if conditioning is not None else 1.0),
        learn_sigma=learn_sigma,
        fix_last_sigma=fix_last_sigma,
        sigma_floor=sigma_floor,
    )
