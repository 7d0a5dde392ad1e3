"""Algorithm `ddaebm`: Denoising Diffusion Adversarial EBM (Geng et al. 2024, ../shared/papers/003; "DDAEBM").

One time-conditioned energy E_theta(x, k) (reward `time_energy`, p_theta(x_k) ∝ exp(+E)) defines the denoising
distribution of every level, p_theta(x_{k-1} | x_k) ∝ exp(E_theta(x_{k-1}, k-1)) q(x_k | x_{k-1}) (Eq. 6), and the
implicit sampler p_phi(x_{k-1} | x_k) (backbone `posterior_sampling`, Eq. 9) chases it. Training is teacher-forced:
every iteration draws forward pairs (x_{k-1}, x_k) ~ q from data at levels k ~ U{1..T} (`schedules.forward_pairs`),
and never rolls the sampler out (`needs_rollout = False`).

Energy step (maximisation, Sec. 3.3, with DDGAN's R1 penalty; `energy_step_loss`):

    L_E = -E(x_{k-1}, k-1) + w_fake E(x~_{k-1}, k-1) + gamma/2 ||grad_{x_{k-1}} [E(x_{k-1}, k-1) + log q(x_k | x_{k-1})]||^2

averaged over the batch, x~_{k-1} ~ p_phi(. | x_k) detached (the official code's `p_condition` term in the penalty).

Generator and encoder step (minimisation of the Jeffrey divergence, Eq. 10):
- L1, the reverse-KL bound (Eq. 17, `reverse_kl_bound`): E over z ~ N(0, I), x~_{k-1} = posterior sample around
  G(x_k, z, k) (reparameterised) of -E(x~_{k-1}, k-1) - log q(x_k | x~_{k-1}) - w_latent log q_psi(z | x~_{k-1}, x_k);
  the last term bounds the intractable entropy H[p_phi(z | x_{k-1}, x_k)] (Eqs. 14-16). w_latent = 0.1 is the
  official code's weight (the paper writes 1).
- L2, the forward-KL bound (Eq. 19, `forward_kl_bound`) on real pairs with the importance weight lambda (Eqs. 20-21,
  `forward_kl_weights`): lambda_k [KL(q_psi(z | x_{k-1}, x_k) || N(0, I)) - log q(x_{k-1} | x_k, G(x_k, z_psi, k))],
  z_psi ~ q_psi; the reconstruction's variance clamped below at `recon_min_variance` (the toy code's 1e-2: the last
  level's posterior variance is 0).

Ablations (the paper's Sec. 4.5): `divergence = "kl"` drops L2 (KL only); `encoder = false` drops q_psi altogether
(L1 without the entropy term, no L2: a WGAN-0GP per level); the backbone's `latent_dim = 0` is z = 0.
Optimisers: Adam with betas (0, 0.9) for the energy (its reward's) and for generator + encoder (here).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from rewardtune.backbones.posterior import PosteriorSamplingPolicy
from rewardtune.backbones.schedules import forward_pairs
from rewardtune.errors import RecipeError
from rewardtune.nets.mlp import SinusoidalTimeEmbedding, TimeMLP
from rewardtune.optim import GradStep
from rewardtune.precision import at_least_fp32
from rewardtune.rewards.time_energy import TimeEnergy
from rewardtune.types import Trajectory

LOG_2PI = math.log(2 * math.pi)


# ---- densities ----------------------------------------------------------------------------------------------------
def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, variance I) summed over the event dimensions: [B]. `variance` [B] (or a scalar) > 0."""
    d = x[0].numel()
    variance = torch.as_tensor(variance, dtype=x.dtype, device=x.device).expand(x.shape[0])
    sq = (x - mean).flatten(1).pow(2).sum(1)
    return -0.5 * sq / variance - 0.5 * d * (variance.log() + LOG_2PI)


def log_forward_step(x_k: torch.Tensor, x_prev: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log q(x_k | x_{k-1}) = log N(x_k; sqrt(1 - beta_k) x_{k-1}, beta_k I) [B] (Eq. 4), beta [B]."""
    shape = (-1,) + (1,) * (x_k.dim() - 1)
    return gaussian_log_density(x_k, (1 - beta).sqrt().view(shape) * x_prev, beta)


def diagonal_normal_log_density(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(log_var))) [B] for z, mean, log_var [B, d]."""
    return -0.5 * ((z - mean).pow(2) / log_var.exp() + log_var + LOG_2PI).sum(1)


def kl_to_standard_normal(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(exp(log_var))) || N(0, I)) [B]."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(1)


# ---- the paper's terms --------------------------------------------------------------------------------------------
def forward_kl_weights(times: torch.Tensor, w: float, w_mid: float) -> torch.Tensor:
    """lambda(t'_k) = w t'_k ^ log_{1/2}(w_mid / w) (Eq. 21; ACT's importance ratio): w at t' = 1, w_mid at t' = 1/2.
    `times` are the levels' VP-SDE times t'_k (`vp_sde_times`)."""
    if w <= 0 or w_mid <= 0:
        raise ValueError(f"the forward-KL weights need w > 0 and w_mid > 0, got {w}, {w_mid}")
    return w * times.pow(math.log(w_mid / w) / math.log(0.5))


def double_backward_attention():
    """Attention in torch's math kernel, whose backward is differentiable again: the gradient penalty differentiates
    the energy's input gradient, which the fused CPU/GPU attention kernels do not support (a UNet energy's attention
    blocks)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def zero_centred_penalty(scores: torch.Tensor, inputs: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma/2 mean_B ||d scores_b / d inputs_b||^2: the zero-centred (R1) gradient penalty of DDGAN/DDAEBM on real
    inputs [B, ...] (requires_grad) with scores [B]; differentiable in the scores' parameters."""
    (grad,) = torch.autograd.grad(scores.sum(), inputs, create_graph=True)
    return 0.5 * gamma * grad.flatten(1).pow(2).sum(1).mean()


def energy_step_loss(energy: TimeEnergy, real_prev: torch.Tensor, x_k: torch.Tensor, fake_prev: torch.Tensor,
                     levels: torch.Tensor, betas: torch.Tensor, *, gamma: float, fake_weight: float
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """L_E of the module docstring for real pairs (x_{k-1}, x_k) and generated x~_{k-1}, levels k [B]; returns the
    loss and its parts (energy/real, energy/fake: batch means of E; energy/penalty)."""
    real_prev = real_prev.detach().requires_grad_(True)
    with double_backward_attention():
        e_real = energy.energy(real_prev, levels - 1)
    penalty = zero_centred_penalty(e_real + log_forward_step(x_k, real_prev, betas[levels]), real_prev, gamma) \
        if gamma > 0 else e_real.new_zeros(())
    e_fake = energy.energy(fake_prev.detach(), levels - 1)
    loss = -e_real.mean() + fake_weight * e_fake.mean() + penalty
    return loss, {"energy/real": e_real.mean().item(), "energy/fake": e_fake.mean().item(),
                  "energy/penalty": penalty.item()}


def reverse_kl_bound(energy: TimeEnergy, fake_prev: torch.Tensor, x_k: torch.Tensor, levels: torch.Tensor,
                     betas: torch.Tensor, latent_log_density: torch.Tensor | None, latent_weight: float) -> torch.Tensor:
    """The upper bound of L1 (Eq. 17) per sample [B]: -E(x~_{k-1}, k-1) - log q(x_k | x~_{k-1}) - w log q_psi(z | x~_{k-1},
    x_k), with x~_{k-1} reparameterised in z and eps; `latent_log_density` None drops the entropy term."""
    bound = -energy.energy(fake_prev, levels - 1) - log_forward_step(x_k, fake_prev, betas[levels])
    if latent_log_density is not None:
        bound = bound - latent_weight * latent_log_density
    return bound


def forward_kl_bound(reconstruction_log_density: torch.Tensor, latent_mean: torch.Tensor, latent_log_var: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """The upper bound of L2 (Eq. 19) per real pair [B]: lambda_k [KL(q_psi || p(z)) - log q(x_{k-1} | x_k, G(x_k,
    z_psi, k))] (the negative ELBO of Eq. 18, weighted)."""
    return weights * (kl_to_standard_normal(latent_mean, latent_log_var) - reconstruction_log_density)


# ---- the encoder q_psi(z | x_{k-1}, x_k) --------------------------------------------------------------------------
class LatentEncoderMLP(nn.Module):
    """q_psi(z | x_{k-1}, x_k) for vectors: (mean, log_var) [B, d] from a `TimeMLP` on [x_{k-1}, x_k] and the level."""

    def __init__(self, dim: int, latent_dim: int, *, hidden: int = 256, depth: int = 3, time_dim: int = 64) -> None:
        super().__init__()
        self.net = TimeMLP(2 * dim, 2 * latent_dim, hidden=hidden, depth=depth, time_dim=time_dim, time_scale=100.0)

    def forward(self, x_prev: torch.Tensor, x_k: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.net(torch.cat([x_prev.flatten(1), x_k.flatten(1)], dim=1), levels.float()).chunk(2, dim=1)
        return mean, log_var


class LatentEncoderConv(nn.Module):
    """q_psi(z | x_{k-1}, x_k) for images [B, C, H, W]: convolutions on both stacked, the level's embedding added,
    pooled to (mean, log_var) [B, d]."""

    def __init__(self, channels: int, latent_dim: int, *, width: int = 32, time_dim: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(2 * channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
        )
        self.embed = nn.Sequential(SinusoidalTimeEmbedding(time_dim), nn.Linear(time_dim, 2 * width), nn.SiLU())
        self.head = nn.Linear(2 * width, 2 * latent_dim)

    def forward(self, x_prev: torch.Tensor, x_k: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(torch.cat([x_prev, x_k], dim=1)).mean(dim=(2, 3)) + self.embed(levels.float() * 100.0)
        mean, log_var = self.head(nn.functional.silu(h)).chunk(2, dim=1)
        return mean, log_var


# ---- the algorithm ------------------------------------------------------------------------------------------------
class DDAEBM:
    """The algorithm of the module docstring: one energy step and one generator/encoder step per iteration.

    Args:
        backbone: the `posterior_sampling` policy.
        energy: the `time_energy` reward (its optimiser is stepped here).
        encoder: q_psi (None: the no-encoder ablation).
        lr: Adam learning rate of generator and encoder.
        gamma: the gradient penalty's weight (r1_gamma; the paper's 0.02 for 2D and CIFAR-10).
        fake_weight: weight of the generated term of the energy step.
        divergence: "jeffrey" (L1 + L2) or "kl" (L1 only).
        latent_weight: weight of the encoder's entropy term in L1.
        forward_kl_w, forward_kl_w_mid: lambda's w and w_mid (Eq. 21; 1 and 1: lambda = 1, the toy setting).
        recon_min_variance: lower clamp of the reconstruction variance in L2.
    """

    needs_rollout = False  # teacher forcing: forward pairs from data, no sampler rollouts
    trains_reward = True  # the energy's updates are this algorithm's (time_energy has no rollout update)
    backbone_mode = "train"

    def __init__(self, backbone: PosteriorSamplingPolicy, energy: TimeEnergy, encoder: nn.Module | None, *,
                 lr: float = 1e-4, grad_clip: float | None = None, gamma: float = 0.02, fake_weight: float = 1.0,
                 divergence: Literal["jeffrey", "kl"] = "jeffrey", latent_weight: float = 0.1,
                 forward_kl_w: float = 1.0, forward_kl_w_mid: float = 1.0, recon_min_variance: float = 1e-2) -> None:
        self.backbone, self.energy, self.encoder = backbone, energy, encoder
        self.gamma, self.fake_weight, self.latent_weight = gamma, fake_weight, latent_weight
        self.divergence = divergence
        self.recon_min_variance = recon_min_variance
        self.weights = forward_kl_weights(backbone.level_times.double(), forward_kl_w, forward_kl_w_mid).float()  # [T + 1]
        params = list(backbone.network_parameters()) + (list(encoder.parameters()) if encoder is not None else [])
        self.optimizer = GradStep([(params, lr)], grad_clip=grad_clip, betas=(0.0, 0.9))

    @property
    def uses_forward_kl(self) -> bool:
        return self.divergence == "jeffrey" and self.encoder is not None and self.backbone.latent_dim > 0

    def update(self, real: torch.Tensor, trajectory: Trajectory | None, generator) -> dict[str, float]:
        """One iteration on data `real` [B, ...] (`trajectory` is None: no rollout)."""
        policy = self.backbone
        n = real.shape[0]
        levels = torch.randint(1, policy.num_steps + 1, (n,), generator=generator, device=real.device)
        real_prev, x_k = forward_pairs(real, levels, policy.schedule, generator)
        betas = policy.betas
        metrics: dict[str, float] = {}

        with torch.no_grad():  # the energy step against the current sampler
            fake_prev, _ = policy.transition(x_k, levels, policy.latent(n, generator), self.noise(x_k, generator))
        loss_e, parts = energy_step_loss(self.energy, real_prev, x_k, fake_prev, levels, betas, gamma=self.gamma,
                                         fake_weight=self.fake_weight)
        self.energy.optimizer.step(loss_e)
        metrics.update(parts, **{"energy/loss": loss_e.item()})

        z = policy.latent(n, generator)  # the generator/encoder step (L1 + L2)
        fake_prev, _ = policy.transition(x_k, levels, z, self.noise(x_k, generator))
        latent_log_density = None
        if self.encoder is not None and policy.latent_dim > 0:
            latent_log_density = diagonal_normal_log_density(z, *self.encoder(fake_prev, x_k, levels))
        l1 = reverse_kl_bound(self.energy, fake_prev, x_k, levels, betas, latent_log_density, self.latent_weight).mean()
        loss = l1
        metrics["generator/reverse_kl_bound"] = l1.item()
        if self.uses_forward_kl:
            l2 = self.forward_kl_term(real_prev, x_k, levels, generator)
            loss = loss + l2
            metrics["generator/forward_kl_bound"] = l2.item()
        self.optimizer.step(loss)
        return metrics

    def forward_kl_term(self, real_prev: torch.Tensor, x_k: torch.Tensor, levels: torch.Tensor, generator) -> torch.Tensor:
        """L2 (Eq. 19) on the real pairs, averaged: the weighted negative ELBO of x_{k-1} given x_k."""
        policy = self.backbone
        mean, log_var = self.encoder(real_prev, x_k, levels)
        z = mean + (0.5 * log_var).exp() * torch.randn(mean.shape, generator=generator, device=mean.device)
        x0 = at_least_fp32(policy.predict_x0(x_k, levels, z))
        variance = policy.posterior_std[policy.num_steps - levels].pow(2).clamp_min(self.recon_min_variance)
        recon = gaussian_log_density(real_prev, policy.posterior_mean(x_k, levels, x0), variance)
        return forward_kl_bound(recon, mean, log_var, self.weights.to(x_k.device)[levels]).mean()

    @staticmethod
    def noise(x: torch.Tensor, generator) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device)

    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder} if self.encoder is not None else {}

    def optimizers(self) -> dict[str, GradStep]:
        return {"sampler": self.optimizer, "energy": self.energy.optimizer}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def guide(self, scale: float):
        raise RecipeError("value guidance needs an algorithm with a value function (dxdp), not 'ddaebm'")


def build_ddaebm(
    backbone,
    reward,
    /,
    *,
    lr: float = 1e-4,
    grad_clip: float | None = None,
    gamma: float = 0.02,
    fake_weight: float = 1.0,
    divergence: Literal["jeffrey", "kl"] = "jeffrey",
    encoder: bool = True,
    latent_weight: float = 0.1,
    forward_kl_w: float = 1.0,
    forward_kl_w_mid: float = 1.0,
    recon_min_variance: float = 1e-2,
    encoder_hidden: int = 256,
    encoder_depth: int = 3,
) -> DDAEBM:
    """Algorithm `ddaebm` (module docstring). Needs backbone `posterior_sampling` and reward `time_energy`; the
    encoder q_psi is an MLP for vectors (`encoder_hidden`, `encoder_depth`) and a small CNN for images.

    Raises:
        RecipeError: another backbone or reward, an unknown divergence, gamma or fake_weight < 0.
    """
    if not isinstance(backbone, PosteriorSamplingPolicy):
        raise RecipeError(f"algorithm 'ddaebm' needs [backbone] kind = \"posterior_sampling\", got {type(backbone).__name__}")
    if not isinstance(reward, TimeEnergy):
        raise RecipeError(f"algorithm 'ddaebm' needs [reward] kind = \"time_energy\", got {type(reward).__name__}")
    if divergence not in ("jeffrey", "kl"):
        raise RecipeError(f"algorithm.divergence must be \"jeffrey\" or \"kl\", got {divergence!r}")
    if gamma < 0 or fake_weight < 0 or latent_weight < 0:
        raise RecipeError("algorithm.gamma, fake_weight and latent_weight must be >= 0")
    if reward.num_levels != backbone.num_steps:
        raise RecipeError(f"the time_energy has {reward.num_levels} levels but the backbone {backbone.num_steps} steps")
    net = None
    if encoder and backbone.latent_dim > 0:
        shape = backbone.sample_shape
        if len(shape) == 1:
            net = LatentEncoderMLP(shape[0], backbone.latent_dim, hidden=encoder_hidden, depth=encoder_depth)
        else:
            net = LatentEncoderConv(shape[0], backbone.latent_dim)
    return DDAEBM(backbone, reward, net, lr=lr, grad_clip=grad_clip, gamma=gamma, fake_weight=fake_weight,
                  divergence=divergence, latent_weight=latent_weight, forward_kl_w=forward_kl_w,
                  forward_kl_w_mid=forward_kl_w_mid, recon_min_variance=recon_min_variance)
