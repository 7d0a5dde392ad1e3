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


def write_tiny_sd_pipeline(path: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A random Stable-Diffusion-layout pipeline folder (written by `StableDiffusionPipeline.save_pretrained`)."""
    import transformers
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    tokenizer_dir = path.parent / f"{path.name}_tokenizer"
    vocab = write_clip_tokenizer(tokenizer_dir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = transformers.CLIPTextModel(clip_text_config(vocab))
    unet = UNet2DConditionModel(
        sample_size=SD_IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=SD_IMAGE_SIZE,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, steps_offset=1, clip_sample=False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(path)
    return path
