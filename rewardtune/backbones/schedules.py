"""Noise schedules and few-step sub-schedules, computed in float64.

- `ddpm_alphas_cumprod`: the DDPM linear-beta training schedule (Ho et al. 2020), alpha_bar_k for k = 0..K-1.
- `strided_timesteps`: a plain strided ("trailing") sub-sequence of T DDPM steps that starts from pure noise (k = K-1).
- `ddim_transition`: the coefficients of one DDIM (eta = 1, i.e. ancestral/posterior-variance) step between two noise
  levels, written in the policy form x_{t+1} = a_t x_t + c_t eps(x_t) + sigma_t z of the DxMI paper's Eq. (1).
- `vp_sde_schedule`, `forward_pairs`, `ddpm_posterior`: the few-step VP-SDE discretisation of DDGAN / DDAEBM (DDAEBM
  Eqs. 47-48), teacher-forced pairs (x_{k-1}, x_k) from data, and the DDPM posterior q(x_{k-1} | x_k, x_0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def ddpm_alphas_cumprod(
    num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, beta_schedule: str = "linear"
) -> torch.Tensor:
    """alpha_bar_k = prod_{i<=k} (1 - beta_i), float64 [K], with betas linear from beta_start to beta_end (DDPM) or
    "scaled_linear", linear in sqrt(beta) (Stable Diffusion's, with beta 0.00085 to 0.012; diffusers' name)."""
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_steps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}: expected 'linear' or 'scaled_linear'")
    return torch.cumprod(1.0 - betas, dim=0)


def strided_timesteps(num_steps: int, num_train_steps: int = 1000) -> torch.Tensor:
    """T DDPM timesteps from K-1 (pure noise) downwards with stride K/T ("trailing" spacing), int64 [T].

    T = 5, K = 1000 gives [999, 799, 599, 399, 199]; T = K gives K-1 .. 0, the full ancestral DDPM sampler.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
    grid = torch.arange(num_train_steps, 0, -num_train_steps / num_steps, dtype=torch.float64)
    return (grid.round() - 1).to(torch.int64)[:num_steps]


@dataclass(frozen=True)
class StepCoefficients:
    """Per-step coefficients of x_{t+1} = a x_t + c eps_theta(x_t, k) + sigma z (float64 tensors [T])."""

    a: torch.Tensor
    c: torch.Tensor
    sigma: torch.Tensor
    alpha_bar_from: torch.Tensor  # the noise level alpha_bar of x_t (what an x0-prediction converts eps with)


def ddim_transition(alpha_bar_from: torch.Tensor, alpha_bar_to: torch.Tensor, eta: float = 1.0) -> StepCoefficients:
    """DDIM step coefficients from noise level alpha_bar_from to the less noisy alpha_bar_to (Song et al. 2021, Eq. 12).

    sigma = eta * sqrt((1 - ab_to) / (1 - ab_from) * (1 - ab_from / ab_to)); with eta = 1 this is the DDPM
    posterior std. The mean sqrt(ab_to) x0_hat + sqrt(1 - ab_to - sigma^2) eps, with
    x0_hat = (x - sqrt(1 - ab_from) eps) / sqrt(ab_from), gives a = sqrt(ab_to / ab_from) and
    c = sqrt(1 - ab_to - sigma^2) - sqrt(1 - ab_from) * a.
    """
    ab_from = alpha_bar_from.to(torch.float64)
    ab_to = alpha_bar_to.to(torch.float64)
    if torch.any(ab_to < ab_from):
        raise ValueError("ddim_transition goes from a noisier to a cleaner level: need alpha_bar_to >= alpha_bar_from")
    sigma = eta * torch.sqrt((1 - ab_to) / (1 - ab_from) * (1 - ab_from / ab_to))
    a = torch.sqrt(ab_to / ab_from)
    c = torch.sqrt((1 - ab_to - sigma**2).clamp_min(0.0)) - torch.sqrt(1 - ab_from) * a
    return StepCoefficients(a=a, c=c, sigma=sigma, alpha_bar_from=ab_from)


def strided_ddpm_schedule(
    num_steps: int, alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, StepCoefficients]:
    """Timesteps [T] (float64) and coefficients of the T-step strided DDPM sampler ending at alpha_bar = 1."""
    timesteps = strided_timesteps(num_steps, alphas_cumprod.shape[0])
    ab_from = alphas_cumprod[timesteps]
    ab_to = torch.cat([alphas_cumprod[timesteps[1:]], torch.ones(1, dtype=torch.float64)])
    return timesteps.to(torch.float64), ddim_transition(ab_from, ab_to)


def fastdpm_variance_schedule(num_steps: int, beta_0: float = 1e-4, target: float | None = None) -> torch.Tensor:
    """FastDPM's quadratic "VAR" schedule (Kong & Ping 2021), as DxMI's CIFAR-10 DDPM runs use it: float64 [T].

    eta_i = beta_0 (1 + i x)^2, i = 0..T-1, with x found by bisection on (0, 0.95 / (sqrt(beta_0) T)) so that
    prod(1 - eta_i) reaches `target` (the K-step alpha_bar). For small T the bisection saturates at the upper
    bound (T = 10: x = 9.5; T = 5: x = 19; T = 4: x = 23.75) and prod(1 - eta) stays far above the target: the
    sampler then starts from N(0, I) as if at a DDPM step of a few hundred (T = 5: ~384).
    """
    if num_steps < 2:  # eta_0 = beta_0 whatever x: one step from N(0, I) would be treated as alpha_bar = 1 - beta_0
        raise ValueError(f"the fastdpm schedule needs num_steps >= 2, got {num_steps}; use schedule = 'strided'")
    if target is None:
        target = float(ddpm_alphas_cumprod()[-1])
    i = torch.arange(num_steps, dtype=torch.float64)

    def product(x: float) -> float:
        return float(torch.prod(1 - beta_0 * (1 + i * x) ** 2))

    low, high = 0.0, 0.95 / (beta_0**0.5) / num_steps
    for _ in range(200):  # bisection: product() decreases in x
        mid = (low + high) / 2
        if product(mid) > target:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return beta_0 * (1 + i * high) ** 2


def continuous_timestep(alpha_bar: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The fractional DDPM step k with alpha_bar(k) = alpha_bar, interpolating log alpha_bar linearly between steps."""
    log_ab = alphas_cumprod.to(torch.float64).log()  # decreasing in k
    target = alpha_bar.to(torch.float64).log()
    k = torch.searchsorted(-log_ab, -target).clamp(1, log_ab.shape[0] - 1)  # log_ab[k-1] >= target > log_ab[k]
    lo, hi = log_ab[k - 1], log_ab[k]
    frac = (lo - target) / (lo - hi)
    return (k - 1).to(torch.float64) + frac.clamp(0, 1)


def alpha_bar_at(k: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """alpha_bar at DDPM steps k (any shape, fractional allowed; float64): exact at integers, log alpha_bar linear
    between them, so `alpha_bar_at(continuous_timestep(ab), .) == ab` (the inverse of `continuous_timestep`)."""
    log_ab = alphas_cumprod.to(torch.float64).log()
    k = torch.as_tensor(k, dtype=torch.float64).clamp(0, log_ab.shape[0] - 1)
    lo = k.floor().long().clamp(max=log_ab.shape[0] - 2)
    frac = k - lo
    return (log_ab[lo] * (1 - frac) + log_ab[lo + 1] * frac).exp()


def fastdpm_ddpm_schedule(num_steps: int, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, StepCoefficients]:
    """Timesteps [T] (fractional DDPM steps) and DDIM(eta = 1) coefficients of the FastDPM VAR sampler.

    Sampler step t goes from level gamma_bar_{T-1-t} to gamma_bar_{T-2-t} (1 at the last step), where gamma_bar is
    the cumulative product of (1 - eta) of `fastdpm_variance_schedule`.
    """
    beta_0 = float(1 - alphas_cumprod[0])  # the schedule's first beta (1e-4 for DDPM's linear betas)
    eta = fastdpm_variance_schedule(num_steps, beta_0=beta_0, target=float(alphas_cumprod[-1]))
    gamma_bar = torch.cumprod(1 - eta, dim=0)  # [T], data order: gamma_bar[0] is the least noisy
    ab_from = gamma_bar.flip(0)  # sampler order
    ab_to = torch.cat([gamma_bar[:-1].flip(0), torch.ones(1, dtype=torch.float64)])
    return continuous_timestep(ab_from, alphas_cumprod), ddim_transition(ab_from, ab_to)


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, stochastic_last: bool = False
) -> torch.Tensor:
    """The EDM noise levels of a T-step sampler (Karras et al. 2022, Eq. 5), float64 [T+1], ending at 0 or sigma_min.

    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..n-1. Without
    `stochastic_last`, n = T and a final 0 is appended (the last step is deterministic); with it, n = T + 1 and the
    grid ends at sigma_min (as DxMI's T = 4 ImageNet sampler).
    """
    n = num_steps + 1 if stochastic_last else num_steps
    i = torch.arange(n, dtype=torch.float64)
    inv = 1.0 / rho
    sigmas = (sigma_max**inv + i / max(n - 1, 1) * (sigma_min**inv - sigma_max**inv)) ** rho
    return sigmas if stochastic_last else torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def ancestral_split(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_up, sigma_down) [T] of ancestral steps sigma_i -> sigma_{i+1} (sigma_down^2 + sigma_up^2 = sigma_{i+1}^2)."""
    s_from, s_to = sigmas[:-1], sigmas[1:]
    sigma_up = torch.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
    sigma_down = torch.sqrt(s_to**2 - sigma_up**2)
    return sigma_up, sigma_down


# ---- the VP-SDE few-step discretisation of DDGAN / DDAEBM ------------------------------------------------------------
# Levels k = 0..T count from (near-)data to noise, as in the papers (x_0 data, x_T noise); a policy that runs from
# noise to data (rewardtune's sampler time t = 0..T) takes level k = T - t.


def vp_sde_variance(t: torch.Tensor, beta_min: float, beta_max: float) -> torch.Tensor:
    """The VP-SDE's marginal variance 1 - exp(-t^2 (beta_max - beta_min) / 2 - t beta_min) at continuous times t in
    [0, 1] (DDAEBM Eq. 47; DDGAN's `var_func_vp`), float64."""
    t = torch.as_tensor(t, dtype=torch.float64)
    log_mean_coeff = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
    return 1.0 - torch.exp(2.0 * log_mean_coeff)


def vp_sde_times(num_steps: int, *, eps_small: float = 1e-3, spacing: str = "uniform") -> torch.Tensor:
    """The T + 1 continuous times t'_k, k = 0..T, of the discretisation (DDAEBM Eq. 48), float64.

    "uniform": t'_k = eps + (1 - eps) k / T (the CIFAR-10 / CelebA / toy code). "lsun": t'_k = k floor(500 / (T - 1)) /
    999 for k < T and t'_T = 1 (no eps; the LSUN code's spacing, which stops the first T levels at about t' = 0.5).

    Raises:
        ValueError: T < 1 (or < 2 for "lsun"), an unknown spacing, eps_small outside [0, 1).
    """
    if num_steps < 1 or (spacing == "lsun" and num_steps < 2):
        raise ValueError(f"num_steps must be >= {2 if spacing == 'lsun' else 1}, got {num_steps}")
    if spacing == "uniform":
        if not 0.0 <= eps_small < 1.0:
            raise ValueError(f"eps_small must be in [0, 1), got {eps_small}")
        return torch.arange(num_steps + 1, dtype=torch.float64) / num_steps * (1.0 - eps_small) + eps_small
    if spacing == "lsun":
        stride = 1000 // ((num_steps - 1) * 2)
        ticks = torch.cat([torch.arange(num_steps, dtype=torch.float64) * stride, torch.tensor([999.0], dtype=torch.float64)])
        return ticks / 999.0
    raise ValueError(f"unknown spacing {spacing!r}: expected 'uniform' or 'lsun'")


@dataclass(frozen=True)
class VPSchedule:
    """A T-level VP-SDE discretisation (float64 tensors).

    `betas` [T + 1]: betas[0] = the variance of level 0 itself (data noised to t'_0 = eps: DDAEBM's x_0 is that, not
    the clean data) and betas[k] = 1 - alpha_bar_k / alpha_bar_{k-1}; `alpha_bars` [T + 1] = 1 - vp_sde_variance(t'_k),
    so x_k | data ~ N(sqrt(alpha_bar_k) data, (1 - alpha_bar_k) I) and x_k | x_{k-1} ~ N(sqrt(1 - beta_k) x_{k-1},
    beta_k I)."""

    betas: torch.Tensor
    alpha_bars: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0] - 1


def vp_sde_schedule(num_steps: int, beta_min: float = 0.1, beta_max: float = 20.0, *, eps_small: float = 1e-3,
                    spacing: str = "uniform", max_beta: float | None = None) -> VPSchedule:
    """The few-step VP-SDE schedule of DDGAN / DDAEBM (`VPSchedule`), from (beta_min, beta_max, T) (defaults: the
    CIFAR-10 settings 0.1, 20; `vp_sde_times` for `eps_small` and `spacing`). `max_beta` clamps the per-step betas (the
    image code's 0.999), after which alpha_bars are recomputed as their cumulative product.

    Raises:
        ValueError: beta_min < 0, beta_max < beta_min, or a bad `vp_sde_times` argument.
    """
    if beta_min < 0 or beta_max < beta_min:
        raise ValueError(f"need 0 <= beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}")
    variance = vp_sde_variance(vp_sde_times(num_steps, eps_small=eps_small, spacing=spacing), beta_min, beta_max)
    alpha_bars = 1.0 - variance
    betas = torch.cat([variance[:1], 1.0 - alpha_bars[1:] / alpha_bars[:-1]])
    if max_beta is not None:
        betas = betas.clamp(max=max_beta)
    return VPSchedule(betas=betas, alpha_bars=torch.cumprod(1.0 - betas, dim=0))


def forward_pairs(x: torch.Tensor, levels: torch.Tensor, schedule: VPSchedule, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced pairs (x_{k-1}, x_k) from data x [B, ...] for levels k [B] in 1..T: x_{k-1} drawn from
    q(x_{k-1} | data) and x_k from q(x_k | x_{k-1}) (DDGAN's `q_sample_pairs`). Returns two tensors like x."""
    if bool((levels < 1).any()) or bool((levels > schedule.num_steps).any()):
        raise ValueError(f"levels must be in 1..{schedule.num_steps}")
    shape = (-1,) + (1,) * (x.dim() - 1)
    alpha_bar = schedule.alpha_bars.to(x.device)[levels - 1].view(shape).to(x.dtype)
    beta = schedule.betas.to(x.device)[levels].view(shape).to(x.dtype)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    previous = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return previous, (1 - beta).sqrt() * previous + beta.sqrt() * noise


@dataclass(frozen=True)
class Posterior:
    """q(x_{k-1} | x_k, x_0) = N(coef_x0[k] x_0 + coef_xk[k] x_k, variance[k] I) for k = 1..T (index 0 unused: zeros),
    float64 [T + 1]."""

    coef_x0: torch.Tensor
    coef_xk: torch.Tensor
    variance: torch.Tensor


def ddpm_posterior(schedule: VPSchedule) -> Posterior:
    """The DDPM posterior (Ho et al. 2020, Eqs. 6-7) of `schedule`'s levels 1..T relative to x_0 = level 0 (DDGAN's
    `Posterior_Coefficients`: the cumulative products restart after beta_0, whose noise is x_0's own):
    coef_x0 = beta_k sqrt(abar_{k-1}) / (1 - abar_k), coef_xk = (1 - abar_{k-1}) sqrt(1 - beta_k) / (1 - abar_k),
    variance = beta_k (1 - abar_{k-1}) / (1 - abar_k), with abar_k = prod_{i=1..k} (1 - beta_i) (abar_0 = 1)."""
    betas = schedule.betas[1:]
    abar = torch.cumprod(1.0 - betas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    zero = torch.zeros(1, dtype=torch.float64)
    return Posterior(
        coef_x0=torch.cat([zero, betas * abar_prev.sqrt() / (1 - abar)]),
        coef_xk=torch.cat([zero, (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)]),
        variance=torch.cat([zero, betas * (1 - abar_prev) / (1 - abar)]),
    )
