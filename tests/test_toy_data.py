"""The 2D toy sets (FFJORD's generators) and mode coverage."""

from __future__ import annotations

import math

import pytest
import torch

from rewardtune.data.toy import EightGaussians, Pinwheel, SwissRoll, TwentyFiveGaussians
from rewardtune.metrics.modes import mode_coverage
from rewardtune.registry import DATA


def test_the_toy_sets_are_registered_and_seeded():
    for kind in ("8gaussians", "25gaussians", "pinwheel", "swissroll"):
        data = DATA.get(kind)()
        a, b = (data.sample(500, torch.Generator().manual_seed(1)) for _ in range(2))
        assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.equal(a, b), kind
        assert not torch.equal(a, data.sample(500, torch.Generator().manual_seed(2))), kind


def test_the_25_gaussians_sit_on_the_scaled_grid_and_their_density_normalises():
    data = TwentyFiveGaussians()
    assert data.centers.shape == (25, 2) and data.num_classes == 25
    assert math.isclose(float(data.centers.max()), 4 / 2.828) and math.isclose(data.mode_std, 0.1 / 2.828)
    x, c = data.sample_conditioned(20000, torch.Generator().manual_seed(0))
    offsets = x.double() - data.centers[c.labels]
    assert abs(float(offsets.std()) - data.mode_std) < 0.002  # each point near its own mode, with the mode's spread
    assert bool((data.classify(x) == c.labels).all())  # modes 7 sigma apart: nearest centre = own mode
    grid = torch.linspace(-2.2, 2.2, 881)
    cell = float(grid[1] - grid[0]) ** 2
    points = torch.cartesian_prod(grid, grid)
    assert abs(float(data.log_density(points).double().exp().sum()) * cell - 1.0) < 0.01


def test_pinwheel_points_lie_on_five_arms_and_swiss_roll_is_sklearns():
    x = Pinwheel().sample(5000, torch.Generator().manual_seed(0)).double()
    radius = x.norm(dim=1) / 2  # unscaled radial coordinate ~ 1 + 0.3 N (tangential part small)
    assert abs(float(radius.mean()) - 1.0) < 0.05
    angle = torch.atan2(x[:, 1], x[:, 0])
    # rotate back by the 0.25 exp(r) twist: the arms' angles are 2 pi k / 5 (up to the tangential spread)
    base = torch.remainder(-angle - 0.25 * torch.exp(radius), 2 * math.pi / 5)
    near_arm = torch.minimum(base, 2 * math.pi / 5 - base) < 0.35
    assert float(near_arm.double().mean()) > 0.9
    from sklearn.datasets import make_swiss_roll

    generator = torch.Generator().manual_seed(4)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(4)))
    expected = torch.from_numpy(make_swiss_roll(n_samples=300, noise=1.0, random_state=seed)[0][:, [0, 2]] / 5).float()
    assert torch.equal(SwissRoll().sample(300, generator), expected)


def test_mode_coverage_counts_modes_with_one_percent_within_two_sigma():
    data = EightGaussians()
    x = data.sample(8000, torch.Generator().manual_seed(0))
    assert mode_coverage(x, data.centers, data.mode_std) == 1.0
    x, c = data.sample_conditioned(8000, torch.Generator().manual_seed(0))
    assert mode_coverage(x[c.labels < 3], data.centers, data.mode_std) == 3 / 8  # three modes only
    # a mode with 0.5% of the samples does not count; with 2% it does
    lone = data.centers[3].float().expand(40, 2)
    assert mode_coverage(torch.cat([x[c.labels == 0][:960], lone[:5]]), data.centers, data.mode_std) == 1 / 8
    assert mode_coverage(torch.cat([x[c.labels == 0][:960], lone[:20]]), data.centers, data.mode_std) == 2 / 8
    assert mode_coverage(torch.zeros(10, 2), data.centers, data.mode_std) == 0.0
    with pytest.raises(ValueError):
        mode_coverage(torch.zeros(0, 2), data.centers, data.mode_std)
