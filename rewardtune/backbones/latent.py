"""Backbone `sd`: a latent text-to-image diffusion model (Stable Diffusion 1.x/2.x class) as a T-step Gaussian policy
in latent space.

Components (diffusers / transformers): a `UNet2DConditionModel` eps- or v-network, an `AutoencoderKL` and a CLIP text
model with its tokenizer, loaded with `from_pretrained` from a hub id or a local pipeline folder (the layout
`StableDiffusionPipeline.save_pretrained` writes: unet/, vae/, text_encoder/, tokenizer/, scheduler/), or from a
folder per component. The training schedule (betas, prediction type) is read from the pipeline's scheduler config.

The policy is `EpsilonChainPolicy` on the latents z (the state; what the value sees): DDIM(eta = 1) transitions on a
T-step sub-schedule with learnable sigma_t, as for `ddpm`. The network is conditioned on the chain's prompt through
cross-attention: each prompt's token states (the text model's last hidden states, [L, D], padded to the tokenizer's
length as SD's pipelines do) are computed once and cached. Classifier-free guidance at `cfg_scale` w uses SD's
unconditional branch, the empty prompt: eps_u + w (eps_c - eps_u) is the policy's eps, so log-probs, values and
improvements are those of the guided policy. Without a [conditions] table every chain gets the empty prompt.

The sample a user (and every reward) gets is the decoded image, `output(z) = clamp(vae.decode(z / scaling_factor +
shift_factor), -1, 1)` in [-1, 1] ([B, 3, H, W]); under gradients the decode is checkpointed (`decode_checkpointing`)
so a differentiated reward does not hold the decoder's activations.

LoRA (`lora_rank` > 0, through peft): adapters on the UNet's attention projections (`lora_targets`); the UNet's own
weights freeze, only the adapters (and sigma_t) train, and only they go into checkpoints (with sigma_t, the value and
the optimisers); the frozen VAE, text model and base UNet are rebuilt from their source on resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rewardtune.backbones.base import IMAGE_RANGE, GaussianChainPolicy
from rewardtune.backbones.epsilon import EpsilonChainPolicy
from rewardtune.conditions import Conditions
from rewardtune.errors import PluginError
from rewardtune.nets.conditioning import Conditioning, classifier_free_guidance
from rewardtune.nets.frozen import (
    keep_frozen_parameters_out_of_checkpoints,
    keep_out_of_checkpoints,
)
from rewardtune.quiet import quiet_libraries

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections LoRA adapts by default (as diffusers' LoRA training scripts and DDPO do)."""


class PromptStates(nn.Module):
    """Prompts -> token states [N, L, D] of a frozen CLIP text model (its last hidden states), cached per prompt.

    Args:
        model: a transformers `CLIPTextModel` (or any model whose output's [0] is [N, L, D]).
        tokenizer: its tokenizer; prompts are padded to its `model_max_length` and truncated to it.
    """

    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(tokenizer.model_max_length)
        self.cache: dict[str, torch.Tensor] = {}
        keep_out_of_checkpoints(self, "model")

    def train(self, mode: bool = True) -> PromptStates:
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        new = sorted({p for p in prompts if p not in self.cache})
        if new:
            tokens = self.tokenizer(new, padding="max_length", max_length=self.max_length, truncation=True,
                                    return_tensors="pt")
            states = self.model(input_ids=tokens.input_ids.to(device))[0]
            for prompt, state in zip(new, states):
                self.cache[prompt] = state.cpu()
        return torch.stack([self.cache[p] for p in prompts]).to(device)


def chain_prompts(condition: Conditions | None, n: int) -> list[str]:
    """The prompt of each of n chains: the condition's prompts, or the empty prompt without a condition."""
    if condition is None:
        return [""] * n
    if condition.prompts is None:
        raise ValueError("a text-to-image backbone is conditioned on prompts, but the conditions have none (class labels?)")
    return list(condition.prompts)


class LatentOutput:
    """What a policy on an autoencoder's latents adds to a `GaussianChainPolicy`: the decoded output, frozen parts
    kept in eval mode and out of checkpoints, and LoRA-aware `network_state`. The subclass names its trained network
    (`network_name`) and calls `init_latent` after the policy's own `__init__`."""

    network_name = ""

    def init_latent(self, vae: nn.Module, prompt_states: nn.Module, decode_checkpointing: bool) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.prompt_states = prompt_states
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0))
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.decode_checkpointing = decode_checkpointing
        keep_out_of_checkpoints(self, "vae")
        # under LoRA: the base network's weights; always: its buffers, constants of its config (SD3's positions)
        keep_frozen_parameters_out_of_checkpoints(self, self.network_name, buffers=True)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] (unclamped)."""
        return self.vae.decode(z / self.scaling_factor + self.shift_factor).sample

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The decoded image in [-1, 1]: [B, 3, H, W] (see `GaussianChainPolicy.output` for the clamp)."""
        if self.decode_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            images = checkpoint(self.decode, x, use_reentrant=False)
        else:
            images = self.decode(x)
        return images.clamp(*IMAGE_RANGE)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen parts stay in eval mode
        return self

    @property
    def network(self) -> nn.Module:
        return getattr(self, self.network_name)

    def network_state(self) -> dict[str, torch.Tensor]:
        """The weights that carry over between samplers of different T: the network's trainable ones (the adapters
        under LoRA; every weight in full fine-tuning)."""
        trainable = {name for name, p in self.network.named_parameters() if p.requires_grad}
        return {f"{self.network_name}.{k}": p.detach() for k, p in self.network.named_parameters()
                if k in trainable or not self.lora}

    @property
    def lora(self) -> bool:
        return bool(getattr(self.network, "peft_config", None))

    def frozen_reference(self) -> GaussianChainPolicy | None:
        """The starting policy for a KL safeguard without a second copy of the network: under LoRA with every
        adapter still at zero (B = 0, so the adapted network is the base one), this network with its adapters
        switched off and sigma_t frozen at their values now (`AdaptersOff`); None otherwise (the caller copies)."""
        if not self.lora:
            return None
        if any(bool(p.detach().abs().sum() > 0) for name, p in self.network.named_parameters() if "lora_B" in name):
            return None
        return AdaptersOff(self)


class AdaptersOff(GaussianChainPolicy):
    """A LoRA policy's base policy: the policy's own mean with its network's adapters disabled, and the policy's
    sigma_t at construction, frozen. It holds no network of its own (the policy is kept outside its submodules)."""

    def __init__(self, policy) -> None:
        super().__init__(policy.sample_shape, policy.sigma().detach().clone(), learn_sigma=False, sigma_floor=1e-30)
        self.policy = [policy]  # not a submodule: no copy, no parameters
        self.conditioning = policy.conditioning

    def mean(self, x: torch.Tensor, t: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        network = self.policy[0].network
        network.disable_adapters()
        try:
            return self.policy[0].mean_at(x, t, condition)
        finally:
            network.enable_adapters()


class LatentEpsilonPolicy(LatentOutput, EpsilonChainPolicy):
    """`EpsilonChainPolicy` in the latent space of `vae`, with a text-conditioned UNet (see the module docstring).

    Args:
        unet: a diffusers `UNet2DConditionModel` (called as unet(z, k, encoder_hidden_states=states).sample).
        vae: a diffusers `AutoencoderKL`.
        prompt_states: the frozen text model (`PromptStates`).
        latent_shape: (C, h, w) of the latents.
        decode_checkpointing: checkpoint the decode under gradients.
        **kwargs: passed to `EpsilonChainPolicy` (num_steps, schedule, betas, prediction, conditioning, cfg_scale,
            learn_sigma, fix_last_sigma, sigma_floor).
    """

    network_name = "eps_net"

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        prompt_states: PromptStates,
        latent_shape: tuple[int, int, int],
        *,
        decode_checkpointing: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(unet, latent_shape, **kwargs)
        self.init_latent(vae, prompt_states, decode_checkpointing)

    def network_output(self, x: torch.Tensor, k: torch.Tensor, condition: Conditions | None, scale: float) -> torch.Tensor:
        states = self.prompt_states(chain_prompts(condition, x.shape[0])).to(x.dtype)  # [B, L, D]
        if scale == 1.0:
            return self.eps_net(x, k, encoder_hidden_states=states).sample
        null = self.prompt_states([""] * x.shape[0]).to(x.dtype)  # SD's unconditional branch: the empty prompt
        both = self.eps_net(torch.cat([x, x]), torch.cat([k, k]), encoder_hidden_states=torch.cat([states, null])).sample
        conditional, unconditional = both.chunk(2)
        return classifier_free_guidance(conditional, unconditional, scale)


def load_component(
    cls_path: str, source: str, subfolder: str | None, what: str, option: str | None = None, **kwargs
):
    """`<cls>.from_pretrained(source, subfolder=...)` with a one-line PluginError when it cannot be had (naming
    backbone.pretrained, and `option` when the component has an option of its own); `kwargs` go to
    `from_pretrained`."""
    module, _, name = cls_path.partition(":")
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
    except ImportError:
        raise PluginError(f"the {what} needs {module.split('.')[0]}: pip install 'rewardtune[latent]'") from None
    try:
        with quiet_libraries():  # offline, huggingface_hub and diffusers warn and log before failing
            where = {"subfolder": subfolder} if subfolder else {}  # transformers fails on subfolder=None
            return cls.from_pretrained(source, **where, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PluginError(
            f"cannot load the {what} from {source!r}{f' (subfolder {subfolder!r})' if subfolder else ''} "
            f"({first[:160]}); offline, point backbone.pretrained{f' (or backbone.{option})' if option else ''} at a "
            "local folder written by save_pretrained"
        ) from None


SD_SCHEDULE = {"num_train_steps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "prediction": "epsilon"}
"""The training schedule of every Stable Diffusion 1.x/2.x model, used where a pipeline's scheduler config is missing
(components given one by one); SD 2.x 768 models predict v (`prediction = "v_prediction"`)."""


def scheduler_settings(source: str) -> dict:
    """The training schedule of a pipeline folder or hub id (its scheduler/scheduler_config.json): betas, horizon
    and prediction type; {} when it has none."""
    from diffusers import DDPMScheduler

    try:
        with quiet_libraries():
            config = DDPMScheduler.load_config(source, subfolder="scheduler")
    except (OSError, ValueError):
        return {}
    keys = {"beta_start": "beta_start", "beta_end": "beta_end", "beta_schedule": "beta_schedule",
            "num_train_timesteps": "num_train_steps", "prediction_type": "prediction"}
    return {ours: config[theirs] for theirs, ours in keys.items() if theirs in config}


def add_lora(unet: nn.Module, rank: int, alpha: float | None, targets: Sequence[str]) -> None:
    """Freeze the UNet and add peft LoRA adapters of `rank` on the `targets` modules (B starts at zero, so the
    adapted UNet starts out computing what it computed before)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise PluginError("backbone.lora_rank needs peft: pip install 'rewardtune[latent]'") from None
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=list(targets))
    try:
        unet.add_adapter(config)
    except ValueError as err:
        raise ValueError(f"lora_targets {list(targets)}: {str(err).splitlines()[0][:160]}") from None


def check_latent_options(
    kind: str, sample_shape: tuple[int, ...], conditioning: Conditioning | None, lora_rank: int,
    lora_alpha: float | None, lora_targets: list[str] | None,
) -> None:
    """The checks every latent text-to-image backbone makes: prompts (not labels), RGB data, LoRA settings."""
    if conditioning is not None and conditioning.text_dim is None:
        raise ValueError(f"backbone {kind!r} is conditioned on prompts; [conditions] gives class labels")
    if len(sample_shape) != 3 or sample_shape[0] != 3:
        raise ValueError(f"backbone {kind!r} makes RGB images (3, H, W), but the data are {tuple(sample_shape)}")
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
    if lora_rank == 0 and (lora_alpha is not None or lora_targets is not None):
        raise ValueError("lora_alpha and lora_targets need lora_rank > 0")


def latent_shape_of(sample_shape: tuple[int, ...], vae: nn.Module, channels: int, patch: int = 1) -> tuple[int, int, int]:
    """(channels, H / f, W / f) for images (3, H, W) and the VAE's downsampling f; H and W must be multiples of f
    times the network's `patch` size."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    height, width = sample_shape[1], sample_shape[2]
    if height % (factor * patch) or width % (factor * patch):
        raise ValueError(f"the image size {height}x{width} is not a multiple of the VAE's downsampling {factor}"
                         + (f" times the network's patch size {patch}" if patch > 1 else ""))
    return channels, height // factor, width // factor


def prepare_network(
    network: nn.Module, lora_rank: int, lora_alpha: float | None, lora_targets: list[str] | None, checkpointing: bool
) -> None:
    """LoRA adapters (rank > 0) and diffusers' gradient checkpointing on a latent backbone's network."""
    if lora_rank > 0:
        add_lora(network, lora_rank, lora_alpha, lora_targets or DEFAULT_LORA_TARGETS)
    if checkpointing:
        network.enable_gradient_checkpointing()


def build_sd_backbone(
    sample_shape: tuple[int, ...],
    conditioning: Conditioning | None = None,
    /,
    *,
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
    unet: str = "",
    vae: str = "",
    text_encoder: str = "",
    num_steps: int = 10,
    schedule: Literal["strided", "fastdpm"] = "strided",
    prediction: Literal["auto", "epsilon", "v_prediction"] = "auto",
    cfg_scale: float | None = None,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_targets: list[str] | None = None,
    gradient_checkpointing: bool = False,
    decode_checkpointing: bool = True,
    learn_sigma: bool = True,
    fix_last_sigma: bool = True,
    sigma_floor: float = 1e-3,
) -> LatentEpsilonPolicy:
    """A Stable-Diffusion-class pipeline as a T-step policy on its latents; see the module docstring.

    `pretrained` is a hub id or a pipeline folder; `unet`, `vae`, `text_encoder` (each a folder written by
    `save_pretrained`, the text encoder's folder also holding its tokenizer) replace that component. The image size is
    the data's ([3, H, W]); the latents are (unet in_channels, H / f, W / f), f the VAE's downsampling. `cfg_scale`
    defaults to 5 (DDPO's) with [conditions] and 1 without; `prediction = "auto"` takes the pipeline scheduler's
    prediction type. Without a scheduler config at `pretrained` the schedule is SD's (`SD_SCHEDULE`).

    Raises:
        PluginError: a component that cannot be loaded (offline: one line naming the local-path option).
        ValueError: class-label conditions, non-RGB data, a bad LoRA setting.
    """
    check_latent_options("sd", sample_shape, conditioning, lora_rank, lora_alpha, lora_targets)
    unet_model = load_component("diffusers:UNet2DConditionModel", unet or pretrained, None if unet else "unet", "unet",
                                "unet")
    vae_model = load_component("diffusers:AutoencoderKL", vae or pretrained, None if vae else "vae", "vae", "vae")
    text_model = load_component("transformers:CLIPTextModel", text_encoder or pretrained,
                                None if text_encoder else "text_encoder", "text encoder", "text_encoder")
    tokenizer = load_component("transformers:CLIPTokenizer", text_encoder or pretrained,
                               None if text_encoder else "tokenizer", "tokenizer", "text_encoder")
    settings = {**SD_SCHEDULE, **scheduler_settings(pretrained)}  # the pipeline's, where it has a scheduler config
    if prediction != "auto":
        settings["prediction"] = prediction
    latent_shape = latent_shape_of(sample_shape, vae_model, int(unet_model.config.in_channels))
    prepare_network(unet_model, lora_rank, lora_alpha, lora_targets, gradient_checkpointing)
    return LatentEpsilonPolicy(
        unet_model,
        vae_model,
        PromptStates(text_model, tokenizer),
        latent_shape,
        decode_checkpointing=decode_checkpointing,
        num_steps=num_steps,
        schedule=schedule,
        conditioning=conditioning,
        cfg_scale=cfg_scale if cfg_scale is not None else (5.0 if conditioning is not None else 1.0),
        learn_sigma=learn_sigma,
        fix_last_sigma=fix_last_sigma,
        sigma_floor=sigma_floor,
        **settings,
    )
