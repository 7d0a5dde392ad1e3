"""`GaussianChainPolicy`: a T-step diffusion sampler seen as a Gaussian policy (DxMI paper, Eq. (1)).

    x_0 ~ pi(x_0),   x_{t+1} = mean_phi(x_t, t) + sigma_t * eps,   eps ~ N(0, I),   t = 0..T-1,

with mean_phi(x_t, t) = a_t x_t + mu_phi(x_t, t) supplied by a subclass and learnable log sigma_t owned here.
A conditional sampler's mean also takes the condition c of the chain (`conditions.Conditions`), mean_phi(x_t, t, c):
the condition is part of the state, drawn once per chain and kept in `Trajectory.condition`; sigma_t do not depend
on it. `conditioning` says what condition the network takes (None: unconditional).
Log-probabilities and entropies are SUMS over the D event dimensions (so the entropy is D log sigma_t + const and
temperatures multiply per-sample, not per-dimension, quantities).

The chain's last state x_T is the policy's state; the sample a user receives is `output(x_T)`, the backbone's
declared output transform (image backbones clamp to [-1, 1], vector backbones keep x_T as it is). Rewards, metrics
and written samples see `output(x_T)`; the value function sees the state x_T.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from rewardtune.conditions import Conditions
from rewardtune.precision import at_least_fp32
from rewardtune.types import Trajectory

IMAGE_RANGE = (-1.0, 1.0)
"""The pixel range of every image source (data/images.py) and so the output range of the image backbones."""

Guide = Callable[..., torch.Tensor]
"""guide(x_{t+1}, t+1, sigma_t) -> adjusted x_{t+1} (a conditional chain adds its `Conditions` as a fourth argument);
used for value guidance at sampling time."""


def noise_log_probs(noises: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """log N(x_{t+1}; mean_t, sigma_t^2 I) of each transition, from the noise that produced it, x_{t+1} = mean_t +
    sigma_t eps_t: -||eps_t||^2 / 2 - D log sigma_t - D/2 log 2 pi, summed over the D dimensions: [T, B] for
    noises [T, B, ...] and sigmas [T]."""
    d = math.prod(noises.shape[2:])
    square = noises.flatten(2).pow(2).sum(2)  # [T, B]
    return -0.5 * square - d * sigmas.log().view(-1, 1) - 0.5 * d * math.log(2 * math.pi)


def gaussian_log_density(x_next: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(x_{t+1}; mean, sigma^2 I), summed over the D dimensions of one sample: [B] for x_next and mean [B, ...]
    (computed in at least fp32) and per-row noise levels sigma [B]."""
    d = math.prod(mean.shape[1:])
    sq = (at_least_fp32(x_next) - at_least_fp32(mean)).flatten(1).pow(2).sum(1)
    return -0.5 * sq / sigma**2 - d * sigma.log() - 0.5 * d * math.log(2 * math.pi)


class StandardNormalPrior(nn.Module):
    """pi(x_0) = N(0, I)."""

    def sample(self, n: int, shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
        return torch.randn((n, *shape), generator=generator, device=device)


class GaussianChainPolicy(nn.Module):
    """Base class of every backbone adapter.

    Subclasses implement `mean(x, t)`, or `mean(x, t, condition=None)` when they take a condition (and then set
    `conditioning`). This class owns the noise levels, sampling, log-probs and entropies; everything else calls
    `mean_at`, which passes a condition only when there is one, so a subclass written for unconditional sampling keeps
    working.

    Args:
        sample_shape: shape of one sample (the event shape), e.g. (2,) or (3, 32, 32).
        initial_sigma: [T] noise levels to start from (clamped below by `sigma_floor`).
        learn_sigma: whether log sigma_t is a trainable parameter.
        fix_last_sigma: keep sigma_{T-1} at its initial value even when the others learn.
        sigma_floor: lower bound on the initial sigma_t (a deterministic schedule step gets this much noise).
        prior: the distribution of x_0 (standard normal by default).
        output_range: (low, high) that `output` clamps the final state to (images: (-1, 1)); None: x_T as it is.
    """

    network_name = ""  # the attribute that holds the network (a subclass names it; `sharding.py` shards it)

    def __init__(
        self,
        sample_shape: tuple[int, ...],
        initial_sigma: torch.Tensor,
        *,
        learn_sigma: bool = True,
        fix_last_sigma: bool = False,
        sigma_floor: float = 1e-3,
        prior: nn.Module | None = None,
        output_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if output_range is not None and not output_range[0] < output_range[1]:
            raise ValueError(f"output_range must be (low, high) with low < high, got {output_range}")
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.output_range = None if output_range is None else (float(output_range[0]), float(output_range[1]))
        log_sigma = initial_sigma.to(torch.float64).clamp_min(sigma_floor).log().float()
        self.fix_last_sigma = fix_last_sigma
        self.log_sigma = nn.Parameter(log_sigma, requires_grad=learn_sigma)  # [T]
        self.register_buffer("initial_log_sigma", log_sigma.clone())
        self.prior = prior if prior is not None else StandardNormalPrior()
        self.conditioning = None  # what condition the network takes (nets.conditioning.Conditioning); None: none

    # ---- sizes -------------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.log_sigma.shape[0]

    @property
    def event_dim(self) -> int:
        """D, the number of dimensions of one sample."""
        return math.prod(self.sample_shape)

    @property
    def device(self) -> torch.device:
        return self.log_sigma.device

    # ---- the policy --------------------------------------------------------------------------------------------
    def mean(self, x: torch.Tensor, t: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        """mean_phi(x_t, t, c) = a_t x_t + mu_phi(x_t, t, c) for per-sample integer times t [B] and conditions c (B
        rows, or None)."""
        raise NotImplementedError

    def mean_at(self, x: torch.Tensor, t: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        """`mean(x, t)`, or `mean(x, t, condition)` when there is a condition: the call every consumer makes."""
        if condition is None:
            return self.mean(x, t)
        if self.conditioning is None:
            raise ValueError(f"{type(self).__name__} is unconditional but was given conditions")
        return self.mean(x, t, condition)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The sample the user gets from final states x_T [B, *sample_shape]: x_T clamped to `output_range`, or x_T
        itself when there is none. A plain clamp (as DDPO and AlignProp clamp decoded images): its gradient is 1
        inside the range and 0 for every coordinate outside it, so a reward of the output never pushes on
        out-of-range pixels."""
        if self.output_range is None:
            return x
        return x.clamp(*self.output_range)

    def sigma(self) -> torch.Tensor:
        """sigma_t for t = 0..T-1: [T]. With `fix_last_sigma` the last entry carries no gradient."""
        log_sigma = self.log_sigma
        if self.fix_last_sigma:
            log_sigma = torch.cat([log_sigma[:-1], self.initial_log_sigma[-1:]])
        return log_sigma.exp()

    def step(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        condition: Conditions | None = None,
        *,
        sigma: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reparameterised transition x_{t+1} = mean(x_t, t, c) + sigma_t * noise (differentiable in phi) for states x
        [B, ...] at times t [B]. `sigma`: sigma_t when every row is at the same t (a 0-d tensor; a caller that holds
        `sigma()` already, as `sample` does); None: looked up per row."""
        if sigma is None:
            sigma = self.sigma()[t].view(-1, *([1] * len(self.sample_shape)))
        return at_least_fp32(self.mean_at(x, t, condition)) + sigma * noise  # the state stays fp32

    def log_prob(
        self, x_next: torch.Tensor, x: torch.Tensor, t: torch.Tensor, condition: Conditions | None = None
    ) -> torch.Tensor:
        """log pi(x_{t+1} | x_t, c), summed over dimensions: [B]."""
        # fp32 even when the network ran in bf16/fp16
        return gaussian_log_density(x_next, self.mean_at(x, t, condition), self.sigma()[t])

    def entropy(self, t: torch.Tensor) -> torch.Tensor:
        """H(pi(. | x_t)) = D log sigma_t + D/2 log(2 pi e), independent of x_t: [len(t)]."""
        d = self.event_dim
        return d * self.sigma()[t].log() + 0.5 * d * math.log(2 * math.pi * math.e)

    # ---- sampling ----------------------------------------------------------------------------------------------
    def times(self, t: int, n: int) -> torch.Tensor:
        return torch.full((n,), t, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        guide: Guide | None = None,
        x0: torch.Tensor | None = None,
        condition: Conditions | None = None,
    ) -> Trajectory:
        """Roll out n chains without gradients from prior draws (or from the given starts `x0`), each under its row of
        `condition` (n rows; None: unconditional). Returns the whole trajectory x_0..x_T with its conditions."""
        if x0 is not None and tuple(x0.shape) != (n, *self.sample_shape):
            raise ValueError(f"x0 has shape {tuple(x0.shape)}, expected {(n, *self.sample_shape)}")
        if condition is not None:
            if len(condition) != n:
                raise ValueError(f"{len(condition)} conditions for {n} chains")
            condition = condition.to(self.device)
        x = self.prior.sample(n, self.sample_shape, generator, self.device) if x0 is None else x0.to(self.device)
        states, noises = [x], []
        sigmas = self.sigma()
        for t in range(self.num_steps):
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = self.step(x, self.times(t, n), noise, condition, sigma=sigmas[t])
            noises.append(noise)
            if guide is not None:
                x = guide(x, t + 1, sigmas[t]) if condition is None else guide(x, t + 1, sigmas[t], condition)
            states.append(x)
        return Trajectory(
            states=torch.stack(states),
            sigmas=sigmas.detach().clone(),
            log_probs=None if guide is not None else noise_log_probs(torch.stack(noises), sigmas),
            condition=condition,
        )

    @torch.no_grad()
    def mean_path(self, x0: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        """The chain run from `x0` with its noise switched off: x_{t+1} = mean(x_t, t, c); returns x_T (a
        deterministic map of x_0, what one-step distillation regresses on)."""
        x = x0.to(self.device)
        for t in range(self.num_steps):
            x = self.mean_at(x, self.times(t, x.shape[0]), condition)
        return x

    def sigma_parameters(self) -> list[nn.Parameter]:
        return [self.log_sigma] if self.log_sigma.requires_grad else []

    def network_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters other than log sigma_t (frozen ones, such as a base UNet under LoRA, left out)."""
        return [p for name, p in self.named_parameters() if name != "log_sigma" and p.requires_grad]
