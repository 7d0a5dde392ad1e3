"""Tiny random models written with `save_pretrained`, for tests that exercise the real loading code offline: a CLIP
text model with a byte-level BPE tokenizer (a vocabulary and merges written here) and a Stable-Diffusion-layout
pipeline folder (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDPMScheduler)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SD_IMAGE_SIZE = 16
"""The tiny pipeline's image size: its VAE downsamples 2x, so the latents are 4 x 8 x 8."""


def bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable character table (the alphabet of its byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    codes = dict(zip(printable, printable, strict=True)) | {b: 256 + i for i, b in enumerate(others)}
    return [chr(codes[b]) for b in range(256)]


def write_clip_tokenizer(path: Path, max_length: int = 16) -> dict[str, int]:
    """A CLIPTokenizer's files (vocab.json, merges.txt, tokenizer_config.json) in `path`; returns the vocabulary."""
    path.mkdir(parents=True, exist_ok=True)
    chars = bytes_to_unicode()
    merges = ["r e", "re d</w>", "c a", "ca t</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab = {t: i for i, t in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "pad_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config | special))
    return vocab


def clip_text_config(vocab: dict[str, int], *, hidden: int = 16, max_length: int = 16):
    import transformers

    eos = vocab["<|endoftext|>"]
    return transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=max_length, projection_dim=8,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos,
    )


def tiny_tokenizer(path: Path):
    """(a CLIPTokenizer written next to `path`, a matching tiny CLIPTextConfig)."""
    import transformers

    tokenizer_dir = path.parent / f"{path.name}_tokenizer"
    vocab = write_clip_tokenizer(tokenizer_dir)
    return transformers.CLIPTokenizer.from_pretrained(tokenizer_dir), clip_text_config(vocab)


def tiny_vae(**extra):
    """A random AutoencoderKL with 2x downsampling to 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=SD_IMAGE_SIZE, **extra,
    )


def write_tiny_sd_pipeline(path: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A random Stable-Diffusion-layout pipeline folder (written by `StableDiffusionPipeline.save_pretrained`)."""
    import transformers
    from diffusers import (
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    tokenizer, config = tiny_tokenizer(path)
    text_encoder = transformers.CLIPTextModel(config)
    unet = UNet2DConditionModel(
        sample_size=SD_IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )
    vae = tiny_vae()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, steps_offset=1, clip_sample=False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(path)
    return path


def write_tiny_sd3_pipeline(path: Path, *, seed: int = 0, shift: float = 3.0) -> Path:
    """A random SD3-layout pipeline folder without T5 (`StableDiffusion3Pipeline.save_pretrained`): two CLIP text
    models with projection, a 1-layer SD3Transformer2DModel on 4-channel latents, a 2x AutoencoderKL."""
    import transformers
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    tokenizer, config = tiny_tokenizer(path)
    config.projection_dim = 16
    encoders = [transformers.CLIPTextModelWithProjection(config) for _ in range(2)]
    transformer = SD3Transformer2DModel(
        sample_size=SD_IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
    )
    vae = tiny_vae(scaling_factor=1.5, shift_factor=0.1)  # SD3's VAE has both
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipeline.save_pretrained(path)
    return path


def write_t5_tokenizer(path: Path, max_length: int = 16):
    """A T5 tokenizer (transformers' tokenizers-backed Unigram) over a few words and the letters, saved to `path`."""
    import transformers

    words = ["a", "an", "red", "blue", "green", "yellow", "circle", "square", "triangle", "cat", "dog", "photo", "of"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"\u2581{w}", -1.0) for w in words),
             *((c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz")]
    tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(path)
    return transformers.T5Tokenizer.from_pretrained(path)


def write_tiny_flux_pipeline(path: Path, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A random FLUX.1-layout pipeline folder (`FluxPipeline.save_pretrained`): a CLIP text model, a tiny T5 encoder
    and tokenizer, a 1+1-layer FluxTransformer2DModel on 4-channel latents packed 2x2 (in_channels 16), a 2x
    AutoencoderKL, and FLUX.1-dev's dynamically shifting scheduler."""
    import transformers
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(seed)
    tokenizer, config = tiny_tokenizer(path)
    t5_tokenizer = write_t5_tokenizer(path.parent / f"{path.name}_t5_tokenizer")
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(t5_tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipeline = FluxPipeline(
        scheduler=scheduler, vae=tiny_vae(scaling_factor=0.36, shift_factor=0.12),
        text_encoder=transformers.CLIPTextModel(config), tokenizer=tokenizer, text_encoder_2=t5,
        tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    pipeline.save_pretrained(path)
    return path


def write_tiny_clip_model(path: Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """A random transformers CLIPModel with its tokenizer and CLIPImageProcessor in one folder (PickScore's layout)."""
    import transformers

    torch.manual_seed(seed)
    vocab = write_clip_tokenizer(path)
    text = clip_text_config(vocab).to_dict()
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": 8}
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size).save_pretrained(path)
    return path
