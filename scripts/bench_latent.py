"""Memory and time of DxDP on a Stable-Diffusion-1.5-architecture latent policy, built from the published component
configs with random weights (nothing is downloaded): parameters trained, checkpoint size, and seconds and peak
memory for a rollout, the VAE decode and one DxDP iteration, with full fine-tuning or LoRA, fp32 or bf16 autocast,
with or without gradient checkpointing.

    python scripts/bench_latent.py [--config sd15|tiny] [--lora-rank 8] [--steps 10] [--batch 1] [--resolution 512]
                                   [--gradient-checkpointing] [--bf16] [--device cpu|cuda] [--threads N]

The policy is `backbones/latent.py: LatentEpsilonPolicy` (the `sd` backbone) at classifier-free guidance 5; the
value is a small time-dependent MLP on the latents and the reward the decoded image's mean brightness, learnt by the
value (terminal = "value"), so one iteration is: a T-step rollout without gradients, the value's TD regression, and
one reparameterised policy-improvement step through the UNet (DxDP, Algorithm 1). Prompts are stand-ins (random
token states of CLIP ViT-L's shape, 77 x 768): the text encoder runs once per prompt and is cached. `--config tiny`
runs the same code on a few-channel model in seconds (the test suite does). Peak memory: CUDA's max allocated, or on
the CPU the process's peak resident set size (which includes building the model).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from rewardtune.algorithms.dxdp import DxDP, DxDPConfig
from rewardtune.backbones.latent import (
    DEFAULT_LORA_TARGETS,
    LatentEpsilonPolicy,
    add_lora,
)
from rewardtune.conditions import Conditions
from rewardtune.nets.conditioning import Conditioning
from rewardtune.nets.value import build_time_mlp_value
from rewardtune.rewards.base import Reward

# The published Stable Diffusion 1.5 component configs (unet/config.json and vae/config.json of the pipeline).
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "scaling_factor": 0.18215,
}
TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (8, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 16, "attention_head_dim": 2, "norm_num_groups": 4,
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "sample_size": 16,
    "block_out_channels": (8, 16), "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2, "norm_num_groups": 4,
}
CONFIGS = {"sd15": (SD15_UNET, SD15_VAE, 77, 768), "tiny": (TINY_UNET, TINY_VAE, 8, 16)}


class StandInPromptStates(nn.Module):
    """Prompts -> fixed random token states [N, L, D] (seeded by the prompt), in place of a CLIP text model."""

    def __init__(self, length: int, width: int) -> None:
        super().__init__()
        self.length, self.width = length, width

    def forward(self, prompts) -> torch.Tensor:
        rows = [torch.randn(self.length, self.width, generator=torch.Generator().manual_seed(len(p) * 7919 + sum(map(ord, p))))
                for p in prompts]
        return torch.stack(rows)


class Brightness(Reward):
    """r(x) = mean pixel of the decoded image: [B]."""

    name = "brightness"

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        return x.flatten(1).mean(1)


def megabytes(state: dict[str, torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in state.values()) / 2**20


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(label: str, fn, device: torch.device, results: dict) -> object:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    results[label] = (time.perf_counter() - start, peak_memory_gib(device))
    return out


def build_policy(args, device: torch.device) -> LatentEpsilonPolicy:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config, vae_config, length, width = CONFIGS[args.config]
    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
    if args.lora_rank > 0:
        add_lora(unet, args.lora_rank, None, DEFAULT_LORA_TARGETS)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    resolution = args.resolution or vae_config["sample_size"]
    latent_shape = (4, resolution // factor, resolution // factor)
    return LatentEpsilonPolicy(
        unet, vae, StandInPromptStates(length, width), latent_shape, num_steps=args.steps, schedule="strided",
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", conditioning=Conditioning(text_dim=8),
        cfg_scale=5.0,
    ).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    parser.add_argument("--lora-rank", type=int, default=8, help="0: full fine-tuning")
    parser.add_argument("--steps", type=int, default=10, help="T")
    parser.add_argument("--batch", type=int, default=1, help="chains per iteration")
    parser.add_argument("--resolution", type=int, default=0, help="image size (default: the VAE's sample_size)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the networks (log-probs stay fp32)")
    parser.add_argument("--kl-weight", type=float, default=0.0,
                        help="the KL safeguard's beta per dimension (its reference: a copy, or the adapters off)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results: dict[str, tuple[float, float]] = {}
    policy = timed("build", lambda: build_policy(args, device), device, results)
    value = build_time_mlp_value(policy.sample_shape, Conditioning(text_dim=8), hidden=128, depth=2, time_dim=64).to(device)
    config = DxDPConfig(tau_entropy=0.1, tau_velocity=0.01, per_dimension=True, entropy_in_value=False,
                        velocity_in_value=False, sampler_lr=1e-5, policy_batch=args.batch, kl_weight=args.kl_weight)
    algorithm = DxDP(policy, Brightness(), value, config=config)
    algorithm.iteration = 10**9  # past the value warm-up: the timed iteration includes policy improvement
    condition = Conditions(prompts=tuple(f"prompt {i}" for i in range(args.batch)), embeddings=torch.zeros(args.batch, 8))
    generator = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def rollout():
        with autocast:
            return policy.sample(args.batch, generator, condition=condition)

    def iteration(trajectory):
        with autocast:
            return algorithm.update(None, trajectory, generator)

    trajectory = timed("rollout (T steps, CFG, no grad)", rollout, device, results)
    with torch.no_grad():
        timed("VAE decode", lambda: policy.output(trajectory.final), device, results)
    timed("DxDP update (TD + policy step)", lambda: iteration(trajectory), device, results)
    trajectory = rollout()
    timed("second DxDP update", lambda: iteration(trajectory), device, results)

    trained = sum(p.numel() for p in policy.network_parameters())
    total = sum(p.numel() for p in policy.eps_net.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        state = {k: v.contiguous() for k, v in policy.state_dict().items()}
        save_file(state, str(path))
        checkpoint_mb = path.stat().st_size / 2**20
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.config}: {where}; latents {tuple(policy.sample_shape)}, T = {args.steps}, batch {args.batch}, "
          f"LoRA rank {args.lora_rank or 'none (full)'}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, KL safeguard "
          + (f"beta {args.kl_weight} ({type(algorithm.reference).__name__} reference)" if args.kl_weight else "off"))
    print(f"UNet parameters {total / 1e6:.1f} M, trained {trained / 1e6:.3f} M; VAE {sum(p.numel() for p in policy.vae.parameters()) / 1e6:.1f} M")
    print(f"backbone checkpoint (model.safetensors of the policy): {checkpoint_mb:.1f} MB "
          f"(full UNet in fp32 would be {megabytes(policy.eps_net.state_dict()):.0f} MB)")
    for label, (seconds, peak) in results.items():
        print(f"{label:34s} {seconds:8.2f} s   peak memory {peak:6.2f} GiB")


if __name__ == "__main__":
    main()
