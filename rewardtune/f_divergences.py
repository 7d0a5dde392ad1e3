"""f-divergences as rewards and losses, and rejection-sampling post-processors built on density ratios.

Convention (used throughout): D_f(P‖Q) = E_Q[f(p/q)] for a convex f with f(1) = 0, and u = p/q is the density ratio
of the numerator P to the denominator Q. f is taken on u ≥ 0 only (f(u) = +inf for u < 0), since u is a ratio of
densities; its convex conjugate f*(v) = sup_{u ≥ 0} [u v − f(u)] is then non-decreasing, so its effective domain is
an interval (−inf, high) or (−inf, high]. Where a conjugate printed in f-GAN (Nowozin et al. 2016, Table 6) comes
from f on all of R (Pearson χ², P&R), this one is smaller or equal, and equal on the range of f′.

- Variational bound (f-GAN, Nowozin et al. 2016, Eq. 4): D_f(P‖Q) ≥ E_P[T] − E_Q[f*(T)] for every T, with equality
  at T = f′(p/q). `variational_lower_bound`.
- f-PG (Agarwal et al. 2023): the gradient of D_f(P_ψ‖P_*) over a policy whose state visitation is P_ψ is the
  policy gradient with per-state cost f′(p_ψ/p_*); a discriminator's logit log(p_ψ/p_*) gives it through
  `f_prime_reward`.
- Precision-recall divergence (Simon et al. 2019, "Revisiting precision recall definition for generative
  modeling"; Vérine et al. 2023, "Precision-Recall Divergence Optimization for Generative Modeling with GANs and
  Normalizing Flows"): f_λ(u) = max(λu, 1) − max(λ, 1).
- Rejection sampling with ratios r = p/p̃ on samples of a model p̃: discriminator rejection sampling (Azadi et al.
  2019) and optimal budgeted rejection (Vérine et al. 2023, "Optimal Budgeted Rejection Sampling for Generative
  Models"), as written in the boosting thesis (Inane 2024, Sec. "Other background").

Every function works elementwise on floating tensors (float32 and float64; the output has the input's shape and
dtype) and raises TypeError on integer tensors.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Elementwise = Callable[[torch.Tensor], torch.Tensor]

MAX_LOGIT = 80.0  # |logit| clamp of ratio_from_logit: exp(80) ≈ 5.5e34 and 1 / exp(80) stay normal float32 numbers
BISECTION_STEPS = 200  # geometric bisection steps for c_K; it stops earlier, once lo and hi are adjacent floats


@dataclass(frozen=True)
class FDivergence:
    """A generator f of D_f(P‖Q) = E_Q[f(p/q)] with its derivative and convex conjugate, elementwise on tensors.

    Build one with `get_f_divergence`; the fields hold the raw formulas, and the methods `f`, `f_prime` and
    `conjugate` add the domain handling. Equality compares the name, parameters and domain, not the functions.

    Attributes:
        name: registry key, e.g. "kl".
        f_fn: f on u ≥ 0.
        f_prime_fn: f′ on u ≥ 0 (a subgradient where f has a kink; −inf where f′(0) is −inf).
        conjugate_fn: f* on its effective domain.
        conjugate_domain: (low, high), the bounds of the effective domain of f*; low is −inf for f on u ≥ 0.
        conjugate_high_closed: whether high itself is in the domain (f* finite there).
        params: the generator's parameters as (name, value) pairs, e.g. (("lam", 2.0),).
    """

    name: str
    f_fn: Elementwise = field(repr=False, compare=False)
    f_prime_fn: Elementwise = field(repr=False, compare=False)
    conjugate_fn: Elementwise = field(repr=False, compare=False)
    conjugate_domain: tuple[float, float] = (-math.inf, math.inf)
    conjugate_high_closed: bool = False
    params: tuple[tuple[str, float], ...] = ()

    def f(self, u: torch.Tensor) -> torch.Tensor:
        """f(u) for ratios u: any shape -> same shape; +inf for u < 0 (outside the domain of f), NaN stays NaN."""
        _check_floating(u, "u")
        nan = u.isnan()
        keep = (u >= 0) | nan
        value = self.f_fn(torch.where(keep, u, torch.ones_like(u)))  # 1 is in every domain: no NaN gradients
        return torch.where(nan, u, torch.where(keep, value, math.inf))

    def f_prime(self, u: torch.Tensor) -> torch.Tensor:
        """f′(u) for ratios u ≥ 0: any shape -> same shape (a subgradient at a kink, as each generator states).

        Raises:
            ValueError: some u < 0, where f has no subgradient (u is a ratio of densities).
        """
        _check_floating(u, "u")
        if bool((u < 0).any()):
            raise ValueError(
                f"{self.name}: f' is undefined for u < 0 (u = p/q is a density ratio); min u = {float(u.min())}"
            )
        return torch.where(u.isnan(), u, self.f_prime_fn(u))

    def conjugate(self, v: torch.Tensor) -> torch.Tensor:
        """f*(v) = sup_{u ≥ 0} [u v − f(u)]: any shape -> same shape; +inf outside `conjugate_domain`, the true sup
        there (clamp with `clamp_to_domain` first to keep bounds finite). NaN stays NaN."""
        _check_floating(v, "v")
        low, high = self.conjugate_domain
        below_high = v <= high if self.conjugate_high_closed else v < high
        nan = v.isnan()
        keep = ((v >= low) & below_high) | nan
        value = self.conjugate_fn(torch.where(keep, v, self._interior_point()))  # finite values and gradients
        return torch.where(nan, v, torch.where(keep, value, math.inf))

    def clamp_to_domain(self, v: torch.Tensor, margin: float = 1e-6) -> torch.Tensor:
        """Clamp v into the domain of f*: to [low, high] when high is closed, to [low, high − margin] when open."""
        low, high = self.conjugate_domain
        top = high if self.conjugate_high_closed else high - margin
        return v.clamp(min=low + (0.0 if math.isinf(low) else margin), max=top)

    def _interior_point(self) -> float:
        low, high = self.conjugate_domain
        if math.isfinite(low) and math.isfinite(high):
            return 0.5 * (low + high)
        if math.isfinite(high):
            return high - 1.0
        return low + 1.0 if math.isfinite(low) else 0.0


def _check_floating(x: torch.Tensor, label: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{label} must be a floating-point tensor (float32 or float64); got {kind}")


def _kl() -> FDivergence:
    """KL(P‖Q): f(u) = u log u, f′(u) = log u + 1, f*(v) = exp(v − 1) on all of R (sup at u = e^{v−1})."""
    return FDivergence(
        "kl",
        f_fn=lambda u: torch.xlogy(u, u),
        f_prime_fn=lambda u: torch.log(u) + 1.0,
        conjugate_fn=lambda v: torch.exp(v - 1.0),
    )


def _reverse_kl() -> FDivergence:
    """KL(Q‖P): f(u) = −log u (+inf at 0), f′(u) = −1/u, f*(v) = −1 − log(−v) for v < 0 (sup at u = −1/v)."""
    return FDivergence(
        "reverse_kl",
        f_fn=lambda u: -torch.log(u),
        f_prime_fn=lambda u: -1.0 / u,
        conjugate_fn=lambda v: -1.0 - torch.log(-v),
        conjugate_domain=(-math.inf, 0.0),
    )


def _js() -> FDivergence:
    """Jensen-Shannon, ½KL(P‖M) + ½KL(Q‖M) with M = (P + Q)/2, so 0 ≤ D ≤ log 2 (GAN form with the ½ factors):
    f(u) = ½[u log u − (u+1) log((u+1)/2)] = ½[u log(2u/(u+1)) − log((u+1)/2)], f′(u) = ½ log(2u/(u+1)),
    f*(v) = −½ log(2 − e^{2v}) for v < ½ log 2 (sup at u = e^{2v}/(2 − e^{2v}))."""
    log2 = math.log(2.0)
    return FDivergence(
        "js",
        f_fn=lambda u: 0.5 * (torch.xlogy(u, 2.0 * u / (u + 1.0)) - torch.log1p(u) + log2),
        f_prime_fn=lambda u: 0.5 * (log2 + torch.log(u) - torch.log1p(u)),
        conjugate_fn=lambda v: -0.5 * (log2 + torch.log1p(-torch.exp(2.0 * v - log2))),
        conjugate_domain=(-math.inf, 0.5 * log2),
    )


def _pearson() -> FDivergence:
    """Pearson χ²(P‖Q) = Σ (p − q)²/q: f(u) = (u − 1)², f′(u) = 2(u − 1), f*(v) = v + v²/4 for v ≥ −2 (sup at
    u = 1 + v/2) and −1 for v < −2 (sup at u = 0); f-GAN's v + v²/4 everywhere comes from f on all of R."""
    return FDivergence(
        "pearson",
        f_fn=lambda u: (u - 1.0) ** 2,
        f_prime_fn=lambda u: 2.0 * (u - 1.0),
        conjugate_fn=lambda v: torch.where(v >= -2.0, v + 0.25 * v**2, -1.0),
    )


def _squared_hellinger() -> FDivergence:
    """Squared Hellinger Σ (√p − √q)² = 2(1 − Σ √(pq)) (no ½ factor): f(u) = (√u − 1)², f′(u) = 1 − 1/√u,
    f*(v) = v/(1 − v) for v < 1 (sup at u = 1/(1 − v)²)."""
    return FDivergence(
        "squared_hellinger",
        f_fn=lambda u: (torch.sqrt(u) - 1.0) ** 2,
        f_prime_fn=lambda u: 1.0 - torch.rsqrt(u),
        conjugate_fn=lambda v: v / (1.0 - v),
        conjugate_domain=(-math.inf, 1.0),
    )


def _precision_recall(lam: float) -> FDivergence:
    """PR-divergence (Simon et al. 2019; Vérine et al. 2023), λ > 0: f_λ(u) = max(λu, 1) − max(λ, 1), so
    D_λ(P‖Q) = min(λ, 1) − Σ min(λp, q) and D_1 = TV(P, Q) = ½ Σ|p − q|.

    Piecewise linear: f′(u) = 0 for u < 1/λ and λ for u ≥ 1/λ (at the kink 1/λ, where ∂f = [0, λ], the right
    derivative λ). f*(v) = max(v, 0)/λ + max(λ, 1) − 1 for v ≤ λ (sup at u = 0 for v < 0, at u = 1/λ for
    0 < v < λ) and +inf for v > λ; Vérine et al. state it on [0, λ], the range of f′.

    Raises:
        ValueError: λ is not a finite number > 0.
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"precision_recall needs a finite lam > 0; got {lam!r}")
    lam = float(lam)
    top = max(lam, 1.0)
    return FDivergence(
        "precision_recall",
        f_fn=lambda u: torch.clamp(lam * u, min=1.0) - top,
        f_prime_fn=lambda u: lam * (lam * u >= 1.0).to(u.dtype),
        conjugate_fn=lambda v: v.clamp(min=0.0) / lam + (top - 1.0),
        conjugate_domain=(-math.inf, lam),
        conjugate_high_closed=True,
        params=(("lam", lam),),
    )


F_DIVERGENCES: dict[str, Callable[..., FDivergence]] = {
    "kl": _kl,
    "reverse_kl": _reverse_kl,
    "js": _js,
    "pearson": _pearson,
    "squared_hellinger": _squared_hellinger,
    "precision_recall": _precision_recall,
}


def get_f_divergence(name: str, **params: float) -> FDivergence:
    """The built-in f-divergence `name` (a key of F_DIVERGENCES) with its parameters, e.g.
    get_f_divergence("precision_recall", lam=2.0).

    Raises:
        ValueError: unknown name (the message lists the known names and a close match), or parameters the
            divergence does not take or rejects.
    """
    factory = F_DIVERGENCES.get(name) if isinstance(name, str) else None
    if factory is None:
        known = sorted(F_DIVERGENCES)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown f-divergence {name!r}{hint} (known: {', '.join(known)})")
    signature = inspect.signature(factory)
    try:
        signature.bind(**params)
    except TypeError:
        takes = ", ".join(signature.parameters) or "no parameters"
        raise ValueError(f"f-divergence {name!r} takes {takes}; got {sorted(params) or 'none'}") from None
    return factory(**params)


def ratio_from_logit(logit: torch.Tensor, max_logit: float = MAX_LOGIT) -> torch.Tensor:
    """The density ratio p/q = exp(logit) from a discriminator's logit log(p/q): any shape -> same shape.

    The logit is first clamped to ±min(max_logit, log(dtype max) − 1) (±80 for float32 and float64, ±10.09 for
    float16), so the ratio is finite and positive and f′ of it is finite for every built-in (f′(0) is −inf for
    KL, reverse KL, JS and Hellinger).
    """
    _check_floating(logit, "logit")
    bound = min(max_logit, math.log(torch.finfo(logit.dtype).max) - 1.0)
    return torch.exp(logit.clamp(min=-bound, max=bound))


def f_prime_reward(div: FDivergence, logit: torch.Tensor) -> torch.Tensor:
    """f′(exp(logit)), the f-GAN optimal critic and the f-PG per-state signal: logit [...] -> [...].

    With logit = log(p/q), f′(p/q) is the functional derivative of D_f(P‖Q) in p: for f-PG (Agarwal et al. 2023),
    P = the policy's state visitation and Q = the expert's, and the policy gradient of D_f(P‖Q) is
    E[Σ_t ∇log π(a_t|s_t) · Σ_t f′(p/q)(s_t)], so f′ is a cost and a maximiser takes −f′ as its reward. (When the
    trained model is the denominator Q instead, the derivative in q is f(u) − u f′(u) = −f*(f′(u)).)
    The logit is clamped as in `ratio_from_logit`.
    """
    return div.f_prime(ratio_from_logit(logit))


def variational_lower_bound(div: FDivergence, t_real: torch.Tensor, t_fake: torch.Tensor) -> torch.Tensor:
    """The f-GAN bound mean(t_real) − mean(f*(t_fake)) ≤ D_f(P‖Q) (Nowozin et al. 2016, Eq. 4): a 0-dim tensor.

    From f(u) ≥ u T − f*(T): E_Q[f(p/q)] ≥ E_Q[(p/q) T − f*(T)] = E_P[T] − E_Q[f*(T)], equal at T = f′(p/q).

    Args:
        t_real: the critic T on samples of P, the numerator ("real", e.g. data): any non-empty shape.
        t_fake: T on samples of Q, the denominator ("fake", e.g. the model): any non-empty shape.

    Returns:
        The bound; −inf when some t_fake lies outside the domain of f* (clamp with `div.clamp_to_domain`).

    Raises:
        ValueError: an empty input.
    """
    _check_floating(t_real, "t_real")
    _check_floating(t_fake, "t_fake")
    if t_real.numel() == 0 or t_fake.numel() == 0:
        raise ValueError(f"variational_lower_bound needs samples; got {t_real.numel()} real and {t_fake.numel()} fake")
    return t_real.mean() - div.conjugate(t_fake).mean()


def _check_ratios(ratio: torch.Tensor, *, positive: bool) -> None:
    _check_floating(ratio, "ratio")
    if ratio.numel() == 0:
        raise ValueError("ratio is empty")
    bad = ~torch.isfinite(ratio) | (ratio <= 0 if positive else ratio < 0)
    if bool(bad.any()):
        need = "> 0" if positive else ">= 0"
        example = float(ratio[bad][0])
        raise ValueError(f"ratios must be finite and {need}; got {int(bad.sum())} that are not, e.g. {example}")


def discriminator_rejection_acceptance(ratio: torch.Tensor, gamma: float, max_ratio: float) -> torch.Tensor:
    """Discriminator rejection sampling (Azadi et al. 2019) in ratios: a_γ = r / (r(1 − e^γ) + e^γ M).

    Azadi et al. accept with σ(F), F = D − D*_M − log(1 − e^{D − D*_M − ε}) − γ, for the logit D = log r and
    D*_M = log M; with ε = 0, σ(F) is the formula above (as printed in the thesis), computed here in that sigmoid
    form so that r = 0 gives 0 and r = M gives 1 for every γ. At γ = 0 it reduces to r/M, plain rejection
    sampling; γ > 0 lowers every acceptance below r/M, γ < 0 raises it.

    Args:
        ratio: r = p/p̃ on samples of the model p̃, in [0, max_ratio]: any shape.
        gamma: the shift γ, any finite real.
        max_ratio: M > 0, a bound on the ratios (Azadi et al. take the largest ratio seen).

    Returns:
        Acceptance probabilities in [0, 1], the shape and dtype of ratio.

    Raises:
        ValueError: M not finite and > 0, γ not finite, or a ratio outside [0, M] or not finite.
    """
    if not math.isfinite(max_ratio) or max_ratio <= 0:
        raise ValueError(f"max_ratio must be finite and > 0; got {max_ratio!r}")
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite; got {gamma!r}")
    _check_ratios(ratio, positive=False)
    if bool((ratio > max_ratio).any()):
        raise ValueError(f"ratios must be <= max_ratio {max_ratio}; got max {float(ratio.max())} (raise max_ratio)")
    return torch.sigmoid(torch.log(ratio) - torch.log(max_ratio - ratio) - gamma)


def budgeted_rejection_constant(ratio: torch.Tensor, budget_k: float) -> float:
    """c_K with mean(min(r c_K, 1)) = 1/K over the given ratios, by bisection (Vérine et al. 2023).

    The mean acceptance g(c) is continuous and strictly increasing on [0, 1/min r], with
    g(1/(K mean r)) ≤ 1/K ≤ g(1/min r) = 1; the bisection runs on log c between those two (in float64) and
    returns its upper end, so the mean acceptance is ≥ 1/K up to rounding. K = 1 gives 1/min r (accept all).

    Args:
        ratio: r = p/p̃ > 0 on samples of the model p̃: any non-empty shape.
        budget_k: K ≥ 1, the mean number of proposals per accepted sample.

    Raises:
        ValueError: K < 1 or not finite, or a ratio that is not finite and > 0.
    """
    if not math.isfinite(budget_k) or budget_k < 1:
        raise ValueError(f"budget_k must be a finite number >= 1; got {budget_k!r}")
    _check_ratios(ratio, positive=True)
    r = ratio.detach().to(torch.float64).flatten()  # [N]
    target = 1.0 / budget_k
    lo, hi = 1.0 / (budget_k * float(r.mean())), 1.0 / float(r.min())
    for _ in range(BISECTION_STEPS):
        if lo >= hi:
            break
        mid = math.sqrt(lo * hi)
        if not lo < mid < hi:  # adjacent floats: converged
            break
        if float((r * mid).clamp(max=1.0).mean()) < target:
            lo = mid
        else:
            hi = mid
    return hi


def budgeted_rejection_acceptance(ratio: torch.Tensor, budget_k: float) -> torch.Tensor:
    """Optimal budgeted rejection (Vérine et al. 2023): a_K = min(r c_K, 1) with mean a_K = 1/K over the samples.

    The thesis prints a_K = min(p c_K/(p̃ M), 1); M is absorbed into c_K here. Samples of p̃ accepted with a_K
    follow p̂ ∝ p̃ min(r c_K, 1) = min(c_K p, p̃), i.e. p capped at p̃/c_K, and K proposals are spent per accepted
    sample on average. Vérine et al. show this acceptance is optimal under the budget for f-divergences between p
    and p̂.

    Args:
        ratio: r = p/p̃ > 0 on samples of the model p̃: any non-empty shape.
        budget_k: K ≥ 1.

    Returns:
        Acceptance probabilities in (0, 1], the shape and dtype of ratio; all 1 for K = 1.

    Raises:
        ValueError: as `budgeted_rejection_constant`.
    """
    c = budgeted_rejection_constant(ratio, budget_k)
    if budget_k == 1:  # r c rounds below 1 at the smallest ratio; K = 1 accepts everything
        return torch.ones_like(ratio)
    return (ratio.to(torch.float64) * c).clamp(max=1.0).to(ratio.dtype)
