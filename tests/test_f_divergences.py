"""rewardtune/f_divergences.py against independent maths: f(1) = 0 and convexity on grids, f′ against central
differences, f* against a brute-force sup over a fine u-grid (and its gradient against the maximiser, Danskin),
Fenchel-Young, D_f between discrete distributions against closed forms written from the definitions of KL, JS
(entropies), Pearson, Hellinger and total variation, the f-GAN bound, and the rejection-sampling acceptances.

All checks run in float64 unless they test float32; discrete expectations are exact sums (no Monte Carlo).
"""

from __future__ import annotations

import math

import pytest
import torch

from rewardtune.f_divergences import (
    F_DIVERGENCES,
    FDivergence,
    budgeted_rejection_acceptance,
    budgeted_rejection_constant,
    discriminator_rejection_acceptance,
    f_prime_reward,
    get_f_divergence,
    ratio_from_logit,
    variational_lower_bound,
)

# (name, params, points v inside the domain of f* whose maximisers u* = argmax_u [u v − f(u)] lie in (0, 30)).
CASES = [
    ("kl", {}, [-1.0, 0.0, 0.5, 1.5]),
    ("reverse_kl", {}, [-3.0, -1.0, -0.4]),
    ("js", {}, [-1.0, 0.0, 0.2, 0.3]),
    ("pearson", {}, [-3.0, -1.0, 0.0, 2.0]),
    ("squared_hellinger", {}, [-2.0, 0.0, 0.5, 0.8]),
    ("precision_recall", {"lam": 0.5}, [-0.5, 0.15, 0.4]),
    ("precision_recall", {"lam": 1.0}, [-0.5, 0.3, 0.8]),
    ("precision_recall", {"lam": 2.5}, [-0.5, 0.75, 2.0]),
]
IDS = [name + "".join(f"-{k}{v}" for k, v in params.items()) for name, params, _ in CASES]

# Brute-force grid for f*: step 1e-4 on [0, 30], so 1/λ for λ in {0.5, 1, 2.5} and u = 0 are grid points.
U_GRID = torch.linspace(0.0, 30.0, 300_001, dtype=torch.float64)  # [G]
RATIOS = torch.logspace(-3, 2, 101, dtype=torch.float64)  # [101], u in [1e-3, 100]

# Discrete example with rational masses, so that "samples" with repeated states give exact expectations.
P_MASS = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) / 10
Q_MASS = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64) / 10
P_SAMPLES = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])  # 10 states drawn with the frequencies of P
Q_SAMPLES = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])


def build(name: str, params: dict) -> FDivergence:
    return get_f_divergence(name, **params)


def discrete_divergence(div: FDivergence, p: torch.Tensor, q: torch.Tensor) -> float:
    """D_f(P‖Q) = Σ_x q(x) f(p(x)/q(x)) for q > 0 everywhere: the definition the module's convention states."""
    return float((q * div.f(p / q)).sum())


def bernoulli(a: float) -> torch.Tensor:
    return torch.tensor([a, 1.0 - a], dtype=torch.float64)


@pytest.mark.parametrize(("name", "params", "inside"), CASES, ids=IDS)
class TestGenerator:
    def test_f_is_zero_at_one_and_convex(self, name, params, inside):
        div = build(name, params)
        one = torch.ones(3, dtype=torch.float64)
        torch.testing.assert_close(div.f(one), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-15)
        # Convexity: second differences on a grid, and f′ non-decreasing. 1e-12 absorbs float64 rounding of values
        # up to ~100.
        u = torch.linspace(0.01, 20.0, 2001, dtype=torch.float64)
        values = div.f(u)
        assert bool(((values[:-2] - 2 * values[1:-1] + values[2:]) >= -1e-12).all())
        assert bool((div.f_prime(u).diff() >= -1e-12).all())
        # f* is convex on its domain too (a sup of affine functions).
        v = torch.linspace(-5.0, 3.0, 801, dtype=torch.float64)
        conj = div.conjugate(v[v < div.conjugate_domain[1] - 0.05])  # an equally spaced grid inside the domain
        assert bool(((conj[:-2] - 2 * conj[1:-1] + conj[2:]) >= -1e-12).all())

    def test_f_prime_matches_central_differences(self, name, params, inside):
        div = build(name, params)
        h = 1e-6
        u = RATIOS[RATIOS > 1e-2]
        kinks = torch.tensor([1.0 / params["lam"]] if "lam" in params else [], dtype=torch.float64)
        u = u[(u[:, None] - kinks[None, :]).abs().gt(10 * h).all(dim=1)]  # the PR generator is smooth off 1/λ
        numeric = (div.f(u + h) - div.f(u - h)) / (2 * h)
        # Central differences: truncation h²|f'''|/6 ≤ 2e-8 for u ≥ 0.01, rounding ~1e-16 |f| / h ≤ 1e-8.
        torch.testing.assert_close(div.f_prime(u), numeric, rtol=1e-6, atol=1e-6)

    def test_conjugate_matches_brute_force_sup(self, name, params, inside):
        div = build(name, params)
        v = torch.tensor(inside, dtype=torch.float64, requires_grad=True)  # [V]
        objective = v.detach()[:, None] * U_GRID[None, :] - div.f(U_GRID)[None, :]  # [V, G]
        brute, argmax = objective.max(dim=1)
        conj = div.conjugate(v)
        # The grid sup is below the true sup by at most (step/2)² f''(u*)/2 ≤ 2.5e-9 · 14 here.
        assert bool((brute <= conj.detach() + 1e-12).all())
        torch.testing.assert_close(conj.detach(), brute, rtol=0, atol=1e-7)
        # Danskin: (f*)′(v) is the maximiser u*; the grid locates it to ~1e-4 (smooth f: ~1e-6 from flatness).
        (grad,) = torch.autograd.grad(conj.sum(), v)
        torch.testing.assert_close(grad, U_GRID[argmax], rtol=0, atol=2e-4)

    def test_fenchel_young_equality(self, name, params, inside):
        # f(u) + f*(f′(u)) = u f′(u): f′(u) is a subgradient, where the sup defining f*(f′(u)) is attained at u.
        div = build(name, params)
        slope = div.f_prime(RATIOS)
        lhs = div.f(RATIOS) + div.conjugate(slope)
        rhs = RATIOS * slope
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)

    def test_domain_handling_dtype_and_nan(self, name, params, inside):
        div = build(name, params)
        assert float(div.f(torch.tensor(-0.5, dtype=torch.float64))) == math.inf
        with pytest.raises(ValueError, match="undefined for u < 0"):
            div.f_prime(torch.tensor([1.0, -1e-9], dtype=torch.float64))
        high = div.conjugate_domain[1]
        if math.isfinite(high):
            assert float(div.conjugate(torch.tensor(high + 1e-3, dtype=torch.float64))) == math.inf
        clamped = div.clamp_to_domain(torch.tensor([-50.0, 50.0], dtype=torch.float64))
        assert bool(torch.isfinite(div.conjugate(clamped)).all())
        for dtype in (torch.float32, torch.float64):
            u = torch.tensor([[0.5, 1.0], [2.0, float("nan")]], dtype=dtype)  # [2, 2]
            for out in (div.f(u), div.f_prime(u), div.conjugate(div.f_prime(u))):
                assert out.shape == (2, 2) and out.dtype == dtype
                assert bool(out[1, 1].isnan()) and bool(torch.isfinite(out.flatten()[:3]).all())
        with pytest.raises(TypeError, match="floating-point"):
            div.f(torch.tensor([1, 2]))

    def test_variational_bound_is_below_and_tight_at_f_prime(self, name, params, inside):
        div = build(name, params)
        exact = discrete_divergence(div, P_MASS, Q_MASS)
        optimal = div.f_prime(P_MASS / Q_MASS)  # [4], the critic T(x) = f′(p/q)
        tight = variational_lower_bound(div, optimal[P_SAMPLES], optimal[Q_SAMPLES])
        assert float(tight) == pytest.approx(exact, rel=1e-12, abs=1e-12)
        generator = torch.Generator().manual_seed(0)
        for _ in range(50):
            critic = div.clamp_to_domain(2.0 * torch.randn(4, generator=generator, dtype=torch.float64))
            assert float(variational_lower_bound(div, critic[P_SAMPLES], critic[Q_SAMPLES])) <= exact + 1e-12
        # A critic outside the domain of f* gives the (valid) bound −inf.
        if math.isfinite(div.conjugate_domain[1]):
            outside = torch.full((4,), div.conjugate_domain[1] + 1.0, dtype=torch.float64)
            assert float(variational_lower_bound(div, outside[P_SAMPLES], outside[Q_SAMPLES])) == -math.inf

    def test_f_prime_reward_is_f_prime_of_the_ratio(self, name, params, inside):
        div = build(name, params)
        logit = torch.tensor([-300.0, -2.0, 0.0, 1.5, 300.0], dtype=torch.float32)
        reward = f_prime_reward(div, logit)
        assert reward.dtype == torch.float32 and bool(torch.isfinite(reward).all())
        torch.testing.assert_close(reward[1:4], div.f_prime(torch.exp(logit[1:4])), rtol=1e-6, atol=1e-6)


def test_discrete_divergences_match_closed_forms_on_bernoullis():
    """KL, reverse KL, JS (through entropies: JS = H(M) − ½H(P) − ½H(Q)), Pearson (a − b)²/(b(1 − b)) and
    squared Hellinger (√a − √b)² + (√(1−a) − √(1−b))², written from their definitions with math only."""

    def kl(a, b):
        return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))

    def entropy(a):
        return -a * math.log(a) - (1 - a) * math.log(1 - a)

    for a, b in [(0.3, 0.6), (0.05, 0.9), (0.5, 0.5), (0.99, 0.2)]:
        p, q = bernoulli(a), bernoulli(b)
        expected = {
            "kl": kl(a, b),
            "reverse_kl": kl(b, a),
            "js": entropy((a + b) / 2) - entropy(a) / 2 - entropy(b) / 2,
            "pearson": (a - b) ** 2 / (b * (1 - b)),
            "squared_hellinger": (math.sqrt(a) - math.sqrt(b)) ** 2 + (math.sqrt(1 - a) - math.sqrt(1 - b)) ** 2,
        }
        for name, value in expected.items():
            assert discrete_divergence(get_f_divergence(name), p, q) == pytest.approx(value, rel=1e-12, abs=1e-14)
        assert discrete_divergence(get_f_divergence("js"), p, q) <= math.log(2)


def test_precision_recall_divergence_known_values():
    """D_1 = TV = ½ Σ|p − q| (= Σ max(p, q) − 1); D_λ = min(λ, 1) − Σ min(λp, q) (Simon et al.'s α_λ); and the
    symmetry D_λ(P‖Q) = λ D_{1/λ}(Q‖P), on the 4-point example and on Bernoullis."""
    pairs = [(P_MASS, Q_MASS), (bernoulli(0.3), bernoulli(0.6)), (bernoulli(0.05), bernoulli(0.9))]
    for p, q in pairs:
        tv = 0.5 * float((p - q).abs().sum())
        assert discrete_divergence(get_f_divergence("precision_recall", lam=1.0), p, q) == pytest.approx(tv, abs=1e-14)
        for lam in (0.2, 0.5, 2.0, 7.0):
            value = discrete_divergence(get_f_divergence("precision_recall", lam=lam), p, q)
            alpha = float(torch.minimum(lam * p, q).sum())
            assert value == pytest.approx(min(lam, 1.0) - alpha, abs=1e-14)
            swapped = discrete_divergence(get_f_divergence("precision_recall", lam=1 / lam), q, p)
            assert value == pytest.approx(lam * swapped, abs=1e-13)


def test_registry_names_params_and_errors():
    assert sorted(F_DIVERGENCES) == ["js", "kl", "pearson", "precision_recall", "reverse_kl", "squared_hellinger"]
    for name in F_DIVERGENCES:
        div = get_f_divergence(name, lam=2.0) if name == "precision_recall" else get_f_divergence(name)
        assert div.name == name
    assert get_f_divergence("precision_recall", lam=2) == get_f_divergence("precision_recall", lam=2.0)
    assert get_f_divergence("precision_recall", lam=2.0).params == (("lam", 2.0),)
    with pytest.raises(ValueError, match=r"'reverse_k'; did you mean 'reverse_kl'\? \(known: js, kl, pearson"):
        get_f_divergence("reverse_k")
    with pytest.raises(ValueError, match=r"unknown f-divergence 'wasserstein' \(known:"):
        get_f_divergence("wasserstein")
    with pytest.raises(ValueError, match=r"'kl' takes no parameters; got \['lam'\]"):
        get_f_divergence("kl", lam=1.0)
    with pytest.raises(ValueError, match=r"'precision_recall' takes lam; got none"):
        get_f_divergence("precision_recall")
    for lam in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite lam > 0"):
            get_f_divergence("precision_recall", lam=lam)


def test_ratio_from_logit_clamps_to_finite_positive_ratios():
    logit = torch.tensor([-1e4, -80.0, 0.0, 3.0, 1e4])
    ratio = ratio_from_logit(logit)
    assert bool((ratio > 0).all()) and bool(torch.isfinite(ratio).all())
    torch.testing.assert_close(ratio[1:4], torch.exp(logit[1:4]))
    assert float(ratio[0]) == float(ratio[1]) == pytest.approx(math.exp(-80.0))
    half = ratio_from_logit(torch.tensor([100.0, -100.0], dtype=torch.float16))
    assert bool(torch.isfinite(half).all()) and bool((half > 0).all())


def test_discriminator_rejection_acceptance():
    ratio = torch.tensor([0.0, 0.1, 0.7, 2.0, 3.9, 4.0], dtype=torch.float64)
    max_ratio = 4.0
    # γ = 0: plain rejection sampling r/M (1e-15: the sigmoid form rounds differently from the division).
    plain = discriminator_rejection_acceptance(ratio, 0.0, max_ratio)
    torch.testing.assert_close(plain, ratio / max_ratio, rtol=0, atol=1e-15)
    previous = None
    for gamma in (-2.0, -0.5, 0.5, 3.0):
        accept = discriminator_rejection_acceptance(ratio, gamma, max_ratio)
        printed = ratio / (ratio * (1 - math.exp(gamma)) + math.exp(gamma) * max_ratio)  # the thesis's a_γ
        torch.testing.assert_close(accept, printed, rtol=1e-12, atol=1e-15)
        assert float(accept[0]) == 0.0 and float(accept[-1]) == 1.0
        if previous is not None:  # larger γ accepts less (strictly, for 0 < r < M)
            assert bool((accept[1:-1] < previous[1:-1]).all())
        previous = accept
    assert discriminator_rejection_acceptance(ratio.float(), 1.0, max_ratio).dtype == torch.float32
    with pytest.raises(ValueError, match="<= max_ratio"):
        discriminator_rejection_acceptance(ratio, 0.0, 3.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        discriminator_rejection_acceptance(torch.tensor([-0.1, 1.0]), 0.0, 4.0)
    with pytest.raises(ValueError, match="max_ratio must be finite and > 0"):
        discriminator_rejection_acceptance(ratio, 0.0, 0.0)


def test_budgeted_rejection_mean_acceptance_is_one_over_k():
    generator = torch.Generator().manual_seed(0)
    ratio = torch.exp(1.5 * torch.randn(5000, generator=generator, dtype=torch.float64))  # [5000], log-normal
    for budget in (1.0, 1.3, 2.0, 10.0, 1000.0):
        for dtype in (torch.float64, torch.float32):
            accept = budgeted_rejection_acceptance(ratio.to(dtype).view(50, 100), budget)
            assert accept.shape == (50, 100) and accept.dtype == dtype
            assert bool((accept > 0).all()) and bool((accept <= 1).all())
            # Bisection to adjacent floats: float64 rounding only; float32 output rounding ~6e-8 relative.
            assert float(accept.double().mean()) == pytest.approx(1.0 / budget, rel=1e-6, abs=1e-6)
    assert bool((budgeted_rejection_acceptance(ratio, 1.0) == 1).all())


def test_budgeted_rejection_accepted_distribution_on_discrete_example():
    """P = (.1, .2, .3, .4), Q = (.4, .3, .2, .1), K = 2.5: by hand, only state 3 saturates (c p ≥ q needs
    c ≥ 0.25 there and ≥ 2/3, 1.5, 4 elsewhere), so 0.1 + 0.6 c = 1/K = 0.4 gives c_K = 0.5. The accepted
    distribution is min(c p, q) / (1/K) = (0.05, 0.1, 0.15, 0.1) / 0.4 = (0.125, 0.25, 0.375, 0.25)."""
    ratio = (P_MASS / Q_MASS)[Q_SAMPLES]  # [10], r on samples of Q with Q's frequencies
    assert budgeted_rejection_constant(ratio, 2.5) == pytest.approx(0.5, rel=1e-12)
    accept = budgeted_rejection_acceptance(ratio, 2.5)
    assert float(accept.mean()) == pytest.approx(0.4, rel=1e-12)
    accepted = torch.zeros(4, dtype=torch.float64).index_add_(0, Q_SAMPLES, accept)  # [4], accepted mass per state
    expected = torch.tensor([0.125, 0.25, 0.375, 0.25], dtype=torch.float64)
    torch.testing.assert_close(accepted / accepted.sum(), expected, rtol=1e-12, atol=1e-12)
    # Rejection moves Q towards P: TV falls from 0.4 to ½(0.025 + 0.05 + 0.075 + 0.15) = 0.15.
    assert 0.5 * float((expected - P_MASS).abs().sum()) == pytest.approx(0.15, abs=1e-15)


def test_budgeted_rejection_errors():
    ratio = torch.tensor([0.5, 1.0, 2.0])
    for budget in (0.99, 0.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="budget_k must be a finite number >= 1"):
            budgeted_rejection_acceptance(ratio, budget)
    for bad in ([0.5, 0.0], [0.5, -1.0], [0.5, math.inf], [0.5, math.nan]):
        with pytest.raises(ValueError, match="finite and > 0"):
            budgeted_rejection_acceptance(torch.tensor(bad), 2.0)
    with pytest.raises(ValueError, match="empty"):
        budgeted_rejection_acceptance(torch.zeros(0), 2.0)
