"""Rejection sampling as a post-processor of a frozen sampler P~, from an estimate of the log density ratio
log r(x) = log p(x) / p~(x) (a discriminator's; the boosting thesis, ../shared/papers/004, Sec. 2.3): proposals are
drawn in batches and each is kept with probability a(x), so the kept samples have density p~ a / E_P~[a].

The acceptance rules are `f_divergences.py`'s (DRS, Azadi et al. 2019: a_gamma = r / (r (1 - e^gamma) + e^gamma M),
exact rejection sampling at gamma = 0; optimal budgeted rejection, Verine et al. 2024: a_K = min(r c_K, 1) with
E_P~[a_K] = 1 / K). Here they are calibrated once on a batch of proposals (DRS's M is its largest ratio, OBRS's c_K
makes its mean acceptance 1 / K) and then applied to a stream of new proposals. Both rules are unchanged when every
log r shifts by a constant, so a discriminator known up to a constant (a DSM-residual one) serves as well; the ratios
are taken relative to the calibration batch's largest, so large logits do not overflow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rewardtune.f_divergences import (
    budgeted_rejection_constant,
    discriminator_rejection_acceptance,
)

RULES = ("drs", "budgeted")
LOWEST_LOG_RATIO = -700.0  # relative log-ratios are clamped here, so exp() stays a positive float64


def acceptance_rule(kind: str, calibration: torch.Tensor, *, budget: float = 2.0,
                    gamma: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The acceptance probability a(log r) [N] -> [N] of `kind` ("drs" or "budgeted", budget K >= 1; gamma: DRS's
    shift), calibrated on the log-ratios of a batch of proposals `calibration` [N']. Raises ValueError for an
    unknown kind or K < 1."""
    if kind not in RULES:
        raise ValueError(f"unknown rejection {kind!r}: expected one of {', '.join(RULES)}")
    shift = float(calibration.max())

    def relative(log_ratio: torch.Tensor) -> torch.Tensor:  # r / r_max of the calibration (ratios above it: 1)
        return torch.exp((log_ratio.double() - shift).clamp(LOWEST_LOG_RATIO, 0.0))

    if kind == "drs":
        return lambda log_ratio: discriminator_rejection_acceptance(relative(log_ratio), gamma, 1.0)
    c = budgeted_rejection_constant(relative(calibration), budget)
    if budget == 1:  # K = 1 keeps every proposal
        return lambda log_ratio: torch.ones(log_ratio.shape, dtype=torch.float64, device=log_ratio.device)
    return lambda log_ratio: (relative(log_ratio) * c).clamp(max=1.0)


def rejection_sample(
    propose: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    accept: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    generator: torch.Generator | None = None,
    *,
    batch: int = 1000,
    max_proposals: int = 10_000_000,
) -> tuple[torch.Tensor, int]:
    """Draw batches of proposals (`propose(batch) -> (x [batch, ...], log r(x) [batch])`) and keep each with
    probability `accept(log r)` until `n` are kept; returns the first n kept samples and the number of proposals
    drawn. Raises RuntimeError past `max_proposals` (an acceptance rate too low for the budget of proposals)."""
    kept, count, proposals = [], 0, 0
    while count < n:
        if proposals >= max_proposals:
            raise RuntimeError(f"rejection sampling kept {count} of {n} samples in {proposals} proposals; the "
                               "acceptance rate is too low (a budgeted rule bounds it)")
        x, log_ratio = propose(batch)
        u = torch.rand(log_ratio.shape, generator=generator, dtype=torch.float64, device=log_ratio.device)
        keep = u < accept(log_ratio.double())
        kept.append(x[keep])
        count += int(keep.sum())
        proposals += batch
    return torch.cat(kept)[:n], proposals
