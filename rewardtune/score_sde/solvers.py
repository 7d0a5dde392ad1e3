"""Solvers of the reverse-time SDE and of the probability-flow ODE over any score function (Song et al. 2021,
Eqs. 6 and 13), with EDM's second-order Heun step (Karras et al. 2022, Algorithm 1) and restart sampling (Xu et al.
2023): the samplers discriminator guidance plugs into.

A score function is `score(x [B, D], t (0-dim tensor)) -> [B, D]`. Times run from the grid's first entry down to its
last (`time_grid`). For the linear SDEs of `sdes.py`, f(x, t) = a(t) x:

    reverse SDE:  dx = [a x - g^2 s(x, t)] dt + g dw_bar        (Euler-Maruyama: `euler_maruyama`)
    PF-ODE:       dx/dt = a x - g^2 s(x, t) / 2                  (`ode_euler`, `ode_heun`)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from rewardtune.score_sde.sdes import SDE, transition_kernel

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(num_steps: int, t_end: float = 1e-3, t_start: float = 1.0) -> torch.Tensor:
    """num_steps + 1 evenly spaced times from t_start down to t_end (float64).

    Raises:
        ValueError: num_steps < 1 or not 0 <= t_end < t_start.
    """
    if num_steps < 1 or not 0 <= t_end < t_start:
        raise ValueError(f"need num_steps >= 1 and 0 <= t_end < t_start, got {num_steps}, {t_end}, {t_start}")
    return torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64)


def ode_velocity(sde: SDE, score: Score, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx/dt of the probability-flow ODE: a(t) x - g(t)^2 s(x, t) / 2."""
    return sde.drift_coefficient(t) * x - 0.5 * sde.diffusion_squared(t) * score(x, t)


def euler_maruyama(sde: SDE, score: Score, x: torch.Tensor, times: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The reverse SDE from x [B, D] at times[0] to times[-1] by Euler-Maruyama (one score call per step)."""
    for t, t_next in itertools.pairwise(times):
        h = t_next - t  # negative
        drift = sde.drift_coefficient(t) * x - sde.diffusion_squared(t) * score(x, t)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = x + drift * h + (sde.diffusion_squared(t) * -h).sqrt() * noise
    return x


def ode_euler(sde: SDE, score: Score, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """The PF-ODE by Euler's method (first order; one score call per step)."""
    for t, t_next in itertools.pairwise(times):
        x = x + ode_velocity(sde, score, x, t) * (t_next - t)
    return x


def ode_heun(sde: SDE, score: Score, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """The PF-ODE by Heun's method (EDM's second-order step: Euler predictor, trapezoidal corrector; two score calls
    per step)."""
    for t, t_next in itertools.pairwise(times):
        h = t_next - t
        d1 = ode_velocity(sde, score, x, t)
        predicted = x + d1 * h
        x = x + 0.5 * (d1 + ode_velocity(sde, score, predicted, t_next)) * h
    return x


def restart(sde: SDE, score: Score, x: torch.Tensor, times: torch.Tensor, *, t_min: float, t_max: float,
            restarts: int, restart_steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023): Heun along `times` down to t_min (which must be one of them), then
    `restarts` times: re-noise x from t_min to t_max with the forward kernel (`transition_kernel`) and Heun back on
    `restart_steps` even steps; then Heun along the rest of `times`.

    Raises:
        ValueError: t_min not in `times`, t_max <= t_min, restarts < 0 or restart_steps < 1.
    """
    hits = torch.nonzero(torch.isclose(times, torch.tensor(t_min, dtype=times.dtype))).flatten()
    if len(hits) != 1 or not t_max > t_min or restarts < 0 or restart_steps < 1:
        raise ValueError(f"restart needs t_min among the grid's times, t_max > t_min, restarts >= 0 and restart_steps "
                         f">= 1; got t_min={t_min}, t_max={t_max}, restarts={restarts}, restart_steps={restart_steps}")
    split = int(hits[0])
    x = ode_heun(sde, score, x, times[: split + 1])
    low, high = times[split], torch.tensor(t_max, dtype=times.dtype)
    loop = torch.linspace(float(high), float(low), restart_steps + 1, dtype=times.dtype)
    for _ in range(restarts):
        m, v = transition_kernel(sde, low, high)
        x = m * x + v.sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = ode_heun(sde, score, x, loop)
    return ode_heun(sde, score, x, times[split:])


def guided_score(score: Score, correction: Score, weight: float | Callable[[torch.Tensor], float] = 1.0,
                 window: tuple[float, float] = (0.0, 1.0)) -> Score:
    """s(x, t) + w(t) c(x, t) for t inside `window` (and s alone outside): discriminator guidance with c = grad_x
    d_phi (Kim et al. 2023), or any other correction. `weight` is a constant or a function of t."""
    low, high = window

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        base = score(x, t)
        if not low <= float(t) <= high:
            return base
        w = weight(t) if callable(weight) else weight
        return base + w * correction(x, t)

    return guided
