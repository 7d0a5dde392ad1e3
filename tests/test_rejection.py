"""Rejection sampling from a log density ratio (rewardtune/rejection.py, on f_divergences.py's acceptance rules): DRS
with the exact ratio samples the target, OBRS meets its budget and moves mass towards the target as the budget grows,
and both ignore a constant offset of the log-ratio."""

from __future__ import annotations

import math

import pytest
import torch

from rewardtune.rejection import acceptance_rule, rejection_sample

WIDE = 1.5  # the proposal P~ = N(0, WIDE^2) against the target P = N(0, 1): r = p / p~ is bounded, sup r = WIDE


def exact_log_ratio(x: torch.Tensor) -> torch.Tensor:
    return (math.log(WIDE) - 0.5 * x.pow(2) * (1 - 1 / WIDE**2)).view(-1)


def proposals(generator: torch.Generator):
    def propose(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = WIDE * torch.randn(n, 1, generator=generator, dtype=torch.float64)
        return x, exact_log_ratio(x)

    return propose


def test_drs_with_the_exact_ratio_samples_the_target_at_rate_one_over_m():
    gen = torch.Generator().manual_seed(0)
    propose = proposals(gen)
    accept = acceptance_rule("drs", propose(20000)[1])
    kept, drawn = rejection_sample(propose, accept, 40000, gen, batch=5000)
    assert kept.shape == (40000, 1)
    # N(0, 1): mean 0 and variance 1 within Monte Carlo error (40k draws: std errors 0.005 and 0.007)
    assert abs(float(kept.mean())) < 0.025 and abs(float(kept.var()) - 1.0) < 0.035
    assert abs(float(accept(propose(50000)[1]).mean()) - 1 / WIDE) < 0.01  # acceptance 1 / M, M = sup r = WIDE
    assert 40000 * WIDE * 0.95 < drawn < 40000 * WIDE * 1.05 + 5000  # (drawn in batches of 5000)
    # the proposal itself is far from it: the test would fail without the rejection
    assert abs(float(propose(40000)[0].var()) - 1.0) > 1.0


@pytest.mark.parametrize("kind", ["drs", "budgeted"])
def test_a_constant_offset_of_the_log_ratio_changes_nothing_and_large_logits_do_not_overflow(kind):
    log_ratio = torch.randn(3000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    plain = acceptance_rule(kind, log_ratio, budget=3.0)(log_ratio)
    shifted = acceptance_rule(kind, log_ratio + 900.0, budget=3.0)(log_ratio + 900.0)
    torch.testing.assert_close(shifted, plain, rtol=1e-9, atol=1e-12)
    assert bool(torch.isfinite(shifted).all())


@pytest.mark.parametrize("budget", [1.0, 1.5, 3.0, 20.0])
def test_the_budgeted_rule_accepts_one_calibration_proposal_in_k(budget):
    log_ratio = torch.randn(5000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    accept = acceptance_rule("budgeted", log_ratio, budget=budget)(log_ratio)
    assert float(accept.mean()) == pytest.approx(1 / budget, rel=1e-6)
    assert float(accept.max()) <= 1.0 and (budget > 1 or bool((accept == 1).all()))  # K = 1 keeps everything


def test_a_large_budget_accepts_in_proportion_to_the_ratio_as_drs_does():
    log_ratio = torch.randn(2000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = acceptance_rule("budgeted", log_ratio, budget=1e4)(log_ratio)
    drs = acceptance_rule("drs", log_ratio)(log_ratio)
    torch.testing.assert_close(drs, torch.exp(log_ratio - log_ratio.max()))  # gamma = 0: r / M
    torch.testing.assert_close(a / drs, (a / drs)[0].expand_as(a), rtol=1e-9, atol=0)


def test_obrs_moves_mass_to_the_mode_the_proposal_misses_as_the_budget_grows():
    """A two-mode target (1/2, 1/2) proposed by a model with weights (0.9, 0.1): the kept mass on the second mode rises
    with K towards 1/2, and the acceptance rate is 1/K."""
    gen = torch.Generator().manual_seed(3)

    def propose(n: int):
        second = torch.rand(n, generator=gen) < 0.1
        log_ratio = torch.where(second, math.log(0.5 / 0.1), math.log(0.5 / 0.9)).double()
        return second.double().view(-1, 1), log_ratio

    masses = []
    for budget in (1.0, 2.0, 5.0):
        accept = acceptance_rule("budgeted", propose(50000)[1], budget=budget)
        kept, drawn = rejection_sample(propose, accept, 20000, gen, batch=5000)
        masses.append(float(kept.mean()))
        assert 20000 <= drawn < 20000 * budget * 1.1 + 5000  # about K proposals per kept sample, in batches of 5000
        assert float(accept(propose(50000)[1]).mean()) == pytest.approx(1 / budget, rel=0.03)
    assert masses[0] == pytest.approx(0.1, abs=0.01) and masses[0] < masses[1] < masses[2]
    assert masses[2] == pytest.approx(0.5, abs=0.02)  # K = 5 >= sup r = 5: exact


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="budget_k must be a finite number >= 1"):
        acceptance_rule("budgeted", torch.zeros(3), budget=0.5)
    with pytest.raises(ValueError, match="unknown rejection"):
        acceptance_rule("top-k", torch.zeros(3))
    never = lambda n: (torch.zeros(n, 1), torch.zeros(n))
    with pytest.raises(RuntimeError, match="acceptance rate is too low"):
        rejection_sample(never, lambda log_ratio: torch.zeros_like(log_ratio), 5, max_proposals=3000)
