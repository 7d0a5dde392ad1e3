"""Toy 2D data, the generators of BNAF/FFJORD (Grathwohl et al. 2019, `lib/toy_data.py`), which the DxMI paper's Sec. 5.1
(8 Gaussians) and DDAEBM's toy experiments (25 Gaussians, pinwheel, Swiss roll) use. Sampling takes an explicit
generator.

- `8gaussians`: centres at radius 4 on the compass and diagonal directions, std 0.5, everything divided by 1.414 (so
  the centres sit at radius ~2.83 with std ~0.354).
- `25gaussians`: centres on the grid {-4, -2, 0, 2, 4}^2, std 0.1, divided by 2.828 (centres 0.707 apart, std 0.035);
  the mode of each point is drawn uniformly (DDAEBM's code tiles each batch of 200 with 8 points per mode).
- `pinwheel`: 5 arms; a point has radial coordinate 1 + 0.3 N and tangential 0.1 N, rotated by its arm's angle plus
  0.25 exp(radial), everything times 2.
- `swissroll`: scikit-learn's `make_swiss_roll(noise=1.0)`, coordinates (x, z), divided by 5.
- `gmm`: an equal-weight mixture of isotropic Gaussians with the recipe's `centers` and `std` (the boosting thesis's
  toy target, `recipes/dg_gmm.toml`).

The mixtures know their modes (`centers`, `mode_std`): `classify`, `log_density`, and the evaluator's mode coverage.
"""

from __future__ import annotations

import math

import torch

from rewardtune.conditions import Conditions

SCALE = 1.414


class GaussianMixture2D:
    """An equal-weight mixture of isotropic Gaussians in R^2, with its exact density; the modes are the class labels
    of a conditional run.

    Args:
        centers: the modes' centres [K, 2] (float64), already divided by `scale`.
        std, scale: each mode's standard deviation is std / scale (`mode_std`), as the generators write it.
    """

    sample_shape = (2,)

    def __init__(self, centers: torch.Tensor, std: float, scale: float) -> None:
        self.centers, self.std, self.scale = centers, std, scale
        self.num_classes = centers.shape[0]

    @property
    def mode_std(self) -> float:
        return self.std / self.scale

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        return self.sample_conditioned(n, generator, device)[0]

    def sample_conditioned(
        self, n: int, generator: torch.Generator | None = None, device="cpu"
    ) -> tuple[torch.Tensor, Conditions]:
        """n points [n, 2] and their modes (class labels 0..K-1)."""
        idx = torch.randint(0, self.num_classes, (n,), generator=generator)
        noise = torch.randn((n, 2), generator=generator, dtype=torch.float64)
        x = self.centers[idx] + noise * self.std / self.scale
        return x.float().to(device), Conditions(labels=idx.to(device))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The mode whose centre is nearest to each point of x [B, 2]: int64 [B]."""
        return torch.cdist(x.double().cpu(), self.centers).argmin(1)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) of the mixture: [B]."""
        s = self.mode_std
        sq = (x.double()[:, None, :] - self.centers[None]).pow(2).sum(-1)  # [B, K]
        log_comp = -0.5 * sq / s**2 - 2 * math.log(s) - math.log(2 * math.pi)
        return (torch.logsumexp(log_comp, dim=1) - math.log(self.num_classes)).float()


class EightGaussians(GaussianMixture2D):
    """The 8-Gaussians distribution (components counter-clockwise from the +x axis)."""

    radius = 4.0

    def __init__(self) -> None:
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        centers = self.radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) / SCALE  # [8, 2]
        super().__init__(centers, 0.5, SCALE)


class TwentyFiveGaussians(GaussianMixture2D):
    """The 25-Gaussians grid (modes row by row from (-4, -4), before scaling)."""

    def __init__(self) -> None:
        grid = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0], dtype=torch.float64)
        centers = torch.cartesian_prod(grid, grid) / 2.828  # [25, 2]
        super().__init__(centers, 0.1, 2.828)


class Pinwheel:
    """FFJORD's pinwheel: 5 arms, radial std 0.3, tangential std 0.1, rate 0.25, scaled by 2 (no closed-form density
    here; the arm of each point is its class)."""

    sample_shape = (2,)
    num_arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        arm = torch.randint(0, self.num_arms, (n,), generator=generator)
        features = torch.randn((n, 2), generator=generator, dtype=torch.float64)
        features = features * torch.tensor([self.radial_std, self.tangential_std], dtype=torch.float64)
        features[:, 0] += 1.0
        angles = arm.double() * (2 * math.pi / self.num_arms) + self.rate * features[:, 0].exp()
        cos, sin = angles.cos(), angles.sin()
        rotated = torch.stack([features[:, 0] * cos + features[:, 1] * sin, -features[:, 0] * sin + features[:, 1] * cos], 1)
        return (2 * rotated).float().to(device)


class SwissRoll:
    """scikit-learn's Swiss roll with noise 1.0, coordinates (x, z) divided by 5 (FFJORD's); the roll's seed is drawn
    from `generator`, so a seeded generator gives the same points."""

    sample_shape = (2,)

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        from sklearn.datasets import make_swiss_roll

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        points, _ = make_swiss_roll(n_samples=n, noise=1.0, random_state=seed)
        return (torch.from_numpy(points[:, [0, 2]]) / 5.0).float().to(device)


def build_eight_gaussians() -> EightGaussians:
    """Data `8gaussians`."""
    return EightGaussians()


def build_twenty_five_gaussians() -> TwentyFiveGaussians:
    """Data `25gaussians`."""
    return TwentyFiveGaussians()


def build_pinwheel() -> Pinwheel:
    """Data `pinwheel`."""
    return Pinwheel()


def build_swiss_roll() -> SwissRoll:
    """Data `swissroll`."""
    return SwissRoll()


def build_gaussian_mixture(*, centers: list[list[float]], std: float) -> GaussianMixture2D:
    """Data `gmm`: equal-weight isotropic Gaussians at `centers` ([K][2], K >= 2) with standard deviation `std`.

    Raises:
        ValueError: centres that are not K >= 2 points of R^2, std <= 0.
    """
    points = torch.as_tensor(centers, dtype=torch.float64)
    if points.dim() != 2 or points.shape[1] != 2 or points.shape[0] < 2:
        raise ValueError(f"centers must be K >= 2 points [x, y]; got shape {tuple(points.shape)}")
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return GaussianMixture2D(points, std, 1.0)
