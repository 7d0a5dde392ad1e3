"""`rewardtune export RUN --to DIR`: a tuned sampler as a diffusers folder, with its few-step sampler.

What is written (the network a run samples with: the EMA weights when the run keeps them, as `rewardtune sample`):
- an `sd3` run: a `StableDiffusion3Pipeline` folder, the transformer's LoRA adapters merged (and also written alone
  to `DIR/lora`), without T5 when the run had none (load it with `text_encoder_3=None, tokenizer_3=None`);
- an `sd` run: a `StableDiffusionPipeline` folder (`DiffusionPipeline.from_pretrained(DIR)` loads it) whose UNet is
  the tuned one, LoRA adapters merged into it; a LoRA run also gets `DIR/lora/pytorch_lora_weights.safetensors`,
  the adapters alone in diffusers' format (on the base model: `pipe.unet.load_lora_adapter(DIR / "lora",
  weight_name="pytorch_lora_weights.safetensors", prefix=None)`);
- an unconditional `ddpm` run: a `DDPMPipeline` folder (the UNet and the training schedule);
- each: `DIR/rewardtune_sampler.json`, the T-step sampler the run was tuned as (SAMPLER_FORMAT): the settings that
  rebuild its schedule, the learned sigma_t, the CFG scale, the latent shape, and the explicit per-step
  arrays of the update

      x_0 ~ N(0, I);   x_{t+1} = a_t x_t + c_t eps(x_t, k_t, c) + sigma_t z_t,   z_t ~ N(0, I);   sample = output(x_T)

  with eps the (guided, prediction-converted) network output at DDPM timestep k_t, so the sampler can be
  re-implemented without rewardtune. `sample_exported(DIR, ...)` runs it from the exported folder alone and, for the
  same seed and conditions, gives what `rewardtune sample` gives for the run (to float tolerance).

- a `flux` run: a `FluxPipeline` folder, adapters merged (and alone in `DIR/lora`), its scheduler, text encoders
  and tokenizers the source pipeline's;

An sd3 or flux folder's sampler file holds the flow-SDE steps instead (levels s_t, coef_a, coef_b: x_{t+1} = a_t x_t +
b_t v(x_t, 1000 s_t, c) + sigma_t z_t; flux's also its guidance_scale). Other backbones (`mlp`, `edm`, `flow`, a conditional `ddpm`) have no
diffusers pipeline to become: a one-line error.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import torch

from rewardtune.backbones.epsilon import EpsilonChainPolicy
from rewardtune.conditions import Conditions
from rewardtune.errors import RecipeError, RewardtuneError
from rewardtune.precision import autocast
from rewardtune.quiet import quiet_libraries

SAMPLER_FILE = "rewardtune_sampler.json"
SAMPLER_FORMAT = "rewardtune-sampler/1"


def export_backbone(backbone, out_dir: Path, *, force: bool = False, mixed_precision: str = "no") -> list[Path]:
    """Write `backbone` (an `sd`, `sd3` or unconditional `ddpm` policy) to `out_dir` as described in the module
    docstring; `mixed_precision` (the run's train.mixed_precision) is recorded so that `sample_exported` samples in
    the run's precision. Returns the paths written at the top level.

    Raises:
        RecipeError: a backbone that cannot be exported, `out_dir` a file, or a non-empty `out_dir` without `force`.
    """
    from rewardtune.backbones.flux import FluxPolicy
    from rewardtune.backbones.latent import LatentEpsilonPolicy
    from rewardtune.backbones.sd3 import LatentFlowPolicy

    if not isinstance(backbone, EpsilonChainPolicy | LatentFlowPolicy):
        raise RecipeError(f"export writes sd, sd3, flux and ddpm runs as diffusers pipelines; this run's backbone is "
                          f"{type(backbone).__name__}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RecipeError(f"{out_dir} is a file; --to names a folder to write")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise RecipeError(f"{out_dir} is not empty; use another --to, or --force to replace it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(backbone, FluxPolicy):
        written, spec = export_flux(backbone, out_dir), flow_sampler_spec(backbone, "flux")
    elif isinstance(backbone, LatentFlowPolicy):
        written, spec = export_sd3(backbone, out_dir), flow_sampler_spec(backbone, "sd3")
    elif isinstance(backbone, LatentEpsilonPolicy):
        written, spec = export_latent(backbone, out_dir), sampler_spec(backbone, "sd")
    else:
        written, spec = export_pixel(backbone, out_dir), sampler_spec(backbone, "ddpm")
    spec["mixed_precision"] = mixed_precision
    (out_dir / SAMPLER_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return [*written, out_dir / SAMPLER_FILE]


def training_scheduler(backbone: EpsilonChainPolicy):
    """The DDPM training schedule of the backbone as a diffusers `DDPMScheduler`."""
    from diffusers import DDPMScheduler

    settings = backbone.schedule_settings
    return DDPMScheduler(num_train_timesteps=settings["num_train_steps"], beta_start=settings["beta_start"],
                         beta_end=settings["beta_end"], beta_schedule=settings["beta_schedule"],
                         prediction_type=settings["prediction"], clip_sample=False, steps_offset=1)


def merged_network(backbone, out_dir: Path, written: list[Path]):
    """A CPU copy of a latent backbone's network with its LoRA adapters (if any) merged, after writing the adapters
    alone to out_dir/lora in diffusers' format."""
    network = copy.deepcopy(backbone.network).to("cpu")
    if backbone.lora:
        network.save_lora_adapter(out_dir / "lora")
        network.fuse_lora()
        network.unload_lora()
        written.append(out_dir / "lora")
    return network


def export_latent(backbone, out_dir: Path) -> list[Path]:
    """The StableDiffusionPipeline folder (adapters merged) and, for a LoRA run, the adapters in diffusers' format."""
    from diffusers import StableDiffusionPipeline

    written = [out_dir / "model_index.json"]
    unet = merged_network(backbone, out_dir, written)
    pipeline = StableDiffusionPipeline(
        vae=backbone.vae, text_encoder=backbone.prompt_states.model, tokenizer=backbone.prompt_states.tokenizer,
        unet=unet, scheduler=training_scheduler(backbone), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir)
    return written


def export_sd3(backbone, out_dir: Path) -> list[Path]:
    """The StableDiffusion3Pipeline folder (adapters merged; without T5 if the run had none) and, for a LoRA run, the
    adapters in diffusers' format."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    written = [out_dir / "model_index.json"]
    transformer = merged_network(backbone, out_dir, written)
    source = backbone.prompt_states.pipeline[0]
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=backbone.shift), vae=backbone.vae,
        text_encoder=source.text_encoder, tokenizer=source.tokenizer, text_encoder_2=source.text_encoder_2,
        tokenizer_2=source.tokenizer_2, text_encoder_3=source.text_encoder_3, tokenizer_3=source.tokenizer_3,
    )
    with quiet_libraries():  # diffusers warns that a missing T5 "cannot be saved"
        pipeline.save_pretrained(out_dir)
    return written


def export_flux(backbone, out_dir: Path) -> list[Path]:
    """The FluxPipeline folder (adapters merged; the source pipeline's scheduler, text encoders and tokenizers) and,
    for a LoRA run, the adapters in diffusers' format."""
    from diffusers import FluxPipeline

    written = [out_dir / "model_index.json"]
    transformer = merged_network(backbone, out_dir, written)
    source = backbone.prompt_states.pipeline[0]
    pipeline = FluxPipeline(
        transformer=transformer, scheduler=source.scheduler, vae=backbone.vae, text_encoder=source.text_encoder,
        tokenizer=source.tokenizer, text_encoder_2=source.text_encoder_2, tokenizer_2=source.tokenizer_2,
    )
    pipeline.save_pretrained(out_dir)
    return written


def export_pixel(backbone: EpsilonChainPolicy, out_dir: Path) -> list[Path]:
    """The DDPMPipeline folder of an unconditional `ddpm` run."""
    from diffusers import DDPMPipeline

    unet = getattr(backbone.eps_net, "unet", None)
    if unet is None or getattr(backbone.eps_net, "condition", None) is not None:
        raise RecipeError("export writes an unconditional ddpm run (a diffusers UNet2DModel) as a DDPMPipeline; this "
                          "run's network has no diffusers equivalent (an mlp, or a rewardtune condition embedding)")
    DDPMPipeline(unet=copy.deepcopy(unet).to("cpu"), scheduler=training_scheduler(backbone)).save_pretrained(out_dir)
    return [out_dir / "model_index.json"]


def floats(t: torch.Tensor) -> list[float]:
    """A tensor [T] as JSON numbers (float64)."""
    return [float(v) for v in t.detach().cpu().double()]


def sampler_spec(backbone: EpsilonChainPolicy, kind: str) -> dict:
    """The sampler of `backbone` as JSON-ready data (see the module docstring)."""
    return {
        "format": SAMPLER_FORMAT,
        "backbone": kind,
        "settings": dict(backbone.schedule_settings),
        "cfg_scale": float(getattr(backbone, "cfg_scale", 1.0)),
        "sample_shape": list(backbone.sample_shape),
        "sigma": floats(backbone.sigma()),
        "timesteps": floats(backbone.timesteps),
        "coef_a": floats(backbone.coef_a),
        "coef_c": floats(backbone.coef_c),
        "alpha_bar": floats(backbone.step_alphas_cumprod),
        "update": "x_{t+1} = coef_a[t] x_t + coef_c[t] eps(x_t, timesteps[t], c) + sigma[t] z_t; eps guided at cfg_scale "
                  "with the empty prompt as the unconditional branch, converted from the network's prediction",
    }


def flow_sampler_spec(backbone, kind: str) -> dict:
    """The sampler of an sd3 or flux backbone as JSON-ready data (the flow SDE's steps; backbones/flow.py)."""
    spec = {
        "format": SAMPLER_FORMAT,
        "backbone": kind,
        "settings": {"num_steps": backbone.num_steps, "shift": backbone.shift, "noise_level": backbone.noise_level},
        "max_sequence_length": backbone.prompt_states.max_sequence_length,
        "cfg_scale": float(backbone.cfg_scale),
        "sample_shape": list(backbone.sample_shape),
        "sigma": floats(backbone.sigma()),
        "levels": floats(backbone.levels),
        "coef_a": floats(backbone.coef_a),
        "coef_b": floats(backbone.coef_b),
        "update": "x_{t+1} = coef_a[t] x_t + coef_b[t] v(x_t, 1000 levels[t], c) + sigma[t] z_t; v guided at cfg_scale "
                  "with the empty prompt as the unconditional branch",
    }
    if kind == "sd3":
        spec["use_t5"] = backbone.prompt_states.pipeline[0].text_encoder_3 is not None
    else:  # flux: the transformer takes the level itself, its distilled guidance and 2x2-packed latents
        spec["guidance_scale"] = backbone.guidance_scale
        spec["update"] += ("; the FLUX transformer is called with levels[t] (not 1000 levels[t]), guidance_scale and "
                           "the latents packed in 2x2 patches, as FluxPipeline calls it")
    return spec


def read_sampler_spec(out_dir: Path) -> dict:
    """The exported folder's `rewardtune_sampler.json`.

    Raises:
        RewardtuneError: no sampler file, or one of another format.
    """
    try:
        spec = json.loads((out_dir / SAMPLER_FILE).read_text())
    except (OSError, ValueError) as err:
        raise RewardtuneError(f"{out_dir} holds no exported sampler ({SAMPLER_FILE}: {err})") from None
    if spec.get("format") != SAMPLER_FORMAT:
        raise RewardtuneError(f"{out_dir / SAMPLER_FILE} is of format {spec.get('format')!r}, not {SAMPLER_FORMAT!r}")
    return spec


def load_exported(out_dir: str | Path, spec: dict | None = None) -> EpsilonChainPolicy:
    """The sampler of an exported folder, rebuilt from the folder alone (diffusers' `from_pretrained` and the JSON,
    read here unless `spec` is given).

    Raises:
        RewardtuneError: no sampler file, or one of another format.
    """
    from diffusers import DiffusionPipeline

    from rewardtune.nets.conditioning import Conditioning

    out_dir = Path(out_dir)
    spec = read_sampler_spec(out_dir) if spec is None else spec
    settings, shape, cfg_scale = spec["settings"], tuple(spec["sample_shape"]), spec["cfg_scale"]
    # the latent policies' `conditioning` only says that the network takes prompts (they encode them themselves)
    if spec["backbone"] == "flux":
        from rewardtune.backbones.flux import (
            FluxPolicy,
            FluxPromptStates,
            load_flux_pipeline,
        )

        pipeline = load_flux_pipeline(str(out_dir))
        policy = FluxPolicy(pipeline.transformer, pipeline.vae, FluxPromptStates(pipeline, spec["max_sequence_length"]),
                            shape, guidance_scale=spec["guidance_scale"], conditioning=Conditioning(text_dim=1),
                            cfg_scale=cfg_scale, **settings)
    elif spec["backbone"] == "sd3":
        from rewardtune.backbones.sd3 import (
            LatentFlowPolicy,
            SD3PromptStates,
            load_sd3_pipeline,
        )

        pipeline = load_sd3_pipeline(str(out_dir), spec["use_t5"])
        policy = LatentFlowPolicy(pipeline.transformer, pipeline.vae, SD3PromptStates(pipeline, spec["max_sequence_length"]),
                                  shape, conditioning=Conditioning(text_dim=1), cfg_scale=cfg_scale, **settings)
    elif spec["backbone"] == "sd":
        from rewardtune.backbones.latent import LatentEpsilonPolicy, PromptStates

        pipeline = DiffusionPipeline.from_pretrained(out_dir)
        policy = LatentEpsilonPolicy(pipeline.unet, pipeline.vae, PromptStates(pipeline.text_encoder, pipeline.tokenizer),
                                     shape, conditioning=Conditioning(text_dim=1), cfg_scale=cfg_scale, **settings)
    else:
        from rewardtune.backbones.base import IMAGE_RANGE
        from rewardtune.backbones.ddpm import UNetEps

        pipeline = DiffusionPipeline.from_pretrained(out_dir)
        policy = EpsilonChainPolicy(UNetEps(pipeline.unet), shape, output_range=IMAGE_RANGE, **settings)
    with torch.no_grad():
        policy.log_sigma.copy_(torch.tensor([math.log(s) for s in spec["sigma"]]))
    return policy.eval()


@torch.no_grad()
def sample_exported(
    out_dir: str | Path, n: int, *, prompts: list[str] | None = None, seed: int = 0, batch: int = 500
) -> torch.Tensor:
    """n samples [n, 3, H, W] in [-1, 1] of an exported folder, with the run's T-step sampler: one chain per prompt
    of `prompts` (n of them; an sd export without prompts samples the empty prompt), `batch` chains at a time. The
    same seed and prompts give `rewardtune sample`'s samples of the run (which draws images 500 chains at a time), in
    the run's mixed precision (under bf16, to bf16's rounding: merged LoRA weights round otherwise)."""
    from rewardtune.evaluation import draw_samples

    spec = read_sampler_spec(Path(out_dir))
    policy = load_exported(out_dir, spec)
    condition = None
    if prompts is not None:
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} samples")
        condition = Conditions(prompts=tuple(prompts))
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    with autocast(policy.device.type, spec.get("mixed_precision", "no")):  # the run's precision
        return draw_samples(policy, n, generator, None, batch, condition)
