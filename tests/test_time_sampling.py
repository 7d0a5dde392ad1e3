"""Time weighting and importance-sampled t for the discriminator's denoising loss (score_sde/time_sampling.py): both
samplers estimate the same objective E_{t ~ U}[lambda(t) l(t)], importance sampling follows its density exactly and
removes the variance the weights carry, and the default path is the loss as it was."""

from __future__ import annotations

import pytest
import torch

from rewardtune.score_sde.discriminator import TimeDiscriminator, discriminator_loss
from rewardtune.score_sde.gmm import DiffusedGMM
from rewardtune.score_sde.sdes import make_sde
from rewardtune.score_sde.time_sampling import TimeSampler, time_weight

T_MIN = 1e-3


def exact_mean(sde, weighting: str, f) -> float:
    """E_{t ~ U[T_MIN, 1]} [lambda(t) / sigma_t^2 f(t)] by a fine trapezoid rule."""
    t = torch.linspace(T_MIN, 1.0, 400001, dtype=torch.float64)
    y = time_weight(weighting, sde, t) / sde.sigma(t) ** 2 * f(t)
    return float(torch.trapezoid(y, t) / (1 - T_MIN))


@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
def test_both_samplers_estimate_the_same_likelihood_weighted_objective(kind):
    sde = make_sde(kind)
    f = lambda t: 2 + torch.sin(3 * t)  # a smooth l(t) in noise units
    exact = exact_mean(sde, "likelihood", f)
    for sampling in ("uniform", "importance"):
        t, w = TimeSampler(sde, weighting="likelihood", sampling=sampling, t_min=T_MIN).sample(
            400000, torch.Generator().manual_seed(0), torch.float64)
        estimate = float((w * f(t)).mean())
        assert abs(estimate - exact) < 0.02 * abs(exact), (sampling, estimate, exact)


def test_importance_sampling_follows_its_density_and_has_constant_weights():
    sde = make_sde("vp")
    sampler = TimeSampler(sde, weighting="likelihood", sampling="importance", t_min=T_MIN)
    t, w = sampler.sample(200000, torch.Generator().manual_seed(1), torch.float64)
    assert torch.all(w == w[0]) and (t >= T_MIN).all() and (t <= 1).all()
    grid = torch.linspace(T_MIN, 1.0, 200001, dtype=torch.float64)
    density = sampler.density(grid)
    for cut in (0.01, 0.05, 0.2, 0.5):  # P(t <= cut) = integral of the density up to cut / the whole integral
        inside = grid <= cut
        expected = float(torch.trapezoid(density[inside], grid[inside]) / torch.trapezoid(density, grid))
        assert abs(float((t <= cut).double().mean()) - expected) < 0.005, cut
    _, uniform_w = TimeSampler(sde, weighting="likelihood", t_min=T_MIN).sample(
        200000, torch.Generator().manual_seed(1), torch.float64)
    # the weights' variance is what importance sampling removes (every weight equal, asserted above; their std in
    # floating point is round-off of the mean, 1e-14 with torch 2.14)
    assert uniform_w.std() > 1.0 and float(w.std()) < 1e-9 * float(w.mean())


def test_sigma2_weighting_is_the_plain_loss():
    """lambda = sigma^2: weights 1 under uniform t, and q is uniform under importance sampling; the default loss is
    what a uniform sigma2 sampler computes, bit for bit."""
    sde = make_sde("subvp")
    t, w = TimeSampler(sde, sampling="importance", t_min=T_MIN).sample(100000, torch.Generator().manual_seed(2))
    assert torch.allclose(w, torch.ones_like(w)) and abs(float(t.mean()) - (1 + T_MIN) / 2) < 0.005
    torch.manual_seed(0)
    disc = TimeDiscriminator(2, hidden=16, depth=2).double()
    model = DiffusedGMM(torch.tensor([0.5, 0.5]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]),
                        0.01 * torch.eye(2).expand(2, 2, 2), sde)
    real0 = model.sample(64, 0.0, torch.Generator().manual_seed(3))
    fake0 = model.sample(64, 0.0, torch.Generator().manual_seed(4))
    plain = discriminator_loss("hybrid", disc, model.score, sde, real0, fake0, torch.Generator().manual_seed(5))
    sampled = discriminator_loss("hybrid", disc, model.score, sde, real0, fake0, torch.Generator().manual_seed(5),
                                 times=TimeSampler(sde, t_min=1e-3))
    assert torch.equal(plain, sampled)


def test_unknown_settings_are_refused():
    sde = make_sde("vp")
    with pytest.raises(ValueError, match="weighting"):
        TimeSampler(sde, weighting="karras")
    with pytest.raises(ValueError, match="sampling"):
        TimeSampler(sde, sampling="stratified")
    with pytest.raises(ValueError, match="t_min"):
        TimeSampler(sde, t_min=0.0)
