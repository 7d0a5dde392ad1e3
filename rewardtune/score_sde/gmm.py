"""Gaussian mixtures diffused by a linear SDE, exactly: the thesis's toy (../shared/papers/004, Sec. 3.1) and a test
bed for every guidance and reward gradient.

A mixture sum_k w_k N(mu_k, Sigma_k) under x_t = alpha_t x_0 + sigma_t eps stays a mixture:

    p_t(x) = sum_k w_k N(x; alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I),

so its density, score grad_x log p_t (a responsibility-weighted sum of -C_k^{-1}(x - alpha_t mu_k)) and the log-ratio of
two such mixtures (and its gradient, what discriminator guidance must learn) are exact at every t.
"""

from __future__ import annotations

import math

import torch

from rewardtune.score_sde.sdes import SDE


class DiffusedGMM:
    """A Gaussian mixture under an SDE, in float64.

    Args:
        weights: [K] positive (normalised here).
        means: [K, D].
        covariances: [K, D, D] symmetric positive definite, or [K] / [K, D] for isotropic / diagonal components.
        sde: the forward process (`sdes.py`).

    Raises:
        ValueError: mismatched shapes, non-positive weights.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor, sde: SDE) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        covariances = torch.as_tensor(covariances, dtype=torch.float64)
        k, d = means.shape
        if weights.shape != (k,) or bool((weights <= 0).any()):
            raise ValueError(f"weights must be [K] = [{k}] and positive, got {tuple(weights.shape)}")
        if covariances.shape == (k,):
            covariances = covariances[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif covariances.shape == (k, d):
            covariances = torch.diag_embed(covariances)
        elif covariances.shape != (k, d, d):
            raise ValueError(f"covariances must be [K], [K, D] or [K, D, D] for K = {k}, D = {d}; got {tuple(covariances.shape)}")
        self.weights = weights / weights.sum()
        self.means, self.covariances, self.sde = means, covariances, sde

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def components(self, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(means [K, D], covariances [K, D, D]) of the diffused components at time t (a scalar)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        alpha, sigma = self.sde.alpha(t), self.sde.sigma(t)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return alpha * self.means, alpha**2 * self.covariances + sigma**2 * eye

    def batch_components(self, t: float | torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(means [n, K, D], covariances [n, K, D, D]) at per-sample times t ([n], or a scalar for all)."""
        t = torch.as_tensor(t, dtype=torch.float64).expand(n)
        alpha, sigma = self.sde.alpha(t)[:, None, None], self.sde.sigma(t)[:, None, None, None]
        eye = torch.eye(self.dim, dtype=torch.float64)
        return alpha * self.means[None], alpha[..., None] ** 2 * self.covariances[None] + sigma**2 * eye

    def component_log_probs(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x; alpha_t mu_k, C_k(t)): [B, K] for x [B, D] at times t ([B] or a scalar)."""
        means, covs = self.batch_components(t, x.shape[0])
        chol = torch.linalg.cholesky(covs)  # [B, K, D, D]
        diff = x.to(torch.float64)[:, None, :] - means  # [B, K, D]
        solved = torch.linalg.solve_triangular(chol, diff[..., None], upper=False).squeeze(-1)
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # [B, K]
        log_normal = -0.5 * (solved.pow(2).sum(-1) + log_det + self.dim * math.log(2 * math.pi))
        return self.weights.log()[None] + log_normal

    def log_prob(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """log p_t(x): [B] (t [B] or a scalar)."""
        return torch.logsumexp(self.component_log_probs(x, t), dim=1)

    def responsibilities(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """p_t(k | x): [B, K]."""
        return torch.softmax(self.component_log_probs(x, t), dim=1)

    def score(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x) = sum_k p_t(k | x) (-C_k(t)^{-1} (x - alpha_t mu_k)): [B, D] (float64; t [B] or a
        scalar)."""
        x = x.to(torch.float64)
        means, covs = self.batch_components(t, x.shape[0])
        precision_diff = torch.linalg.solve(covs, (x[:, None, :] - means)[..., None]).squeeze(-1)
        return -(self.responsibilities(x, t)[..., None] * precision_diff).sum(1)

    def sample(self, n: int, t: float | torch.Tensor = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws [n, D] from p_t, and (`sample_labeled`) their components."""
        return self.sample_labeled(n, t, generator)[0]

    def sample_labeled(self, n: int, t: float | torch.Tensor = 0.0, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws [n, D] from p_t and their components [n] (int64)."""
        means, covs = self.components(t)
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(covs)
        return means[labels] + (chol[labels] @ noise[..., None]).squeeze(-1), labels


def log_ratio(p: DiffusedGMM, q: DiffusedGMM, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """log p_t(x) - log q_t(x): [B], the log density ratio a discriminator of p (real) against q (model) learns."""
    return p.log_prob(x, t) - q.log_prob(x, t)


def log_ratio_gradient(p: DiffusedGMM, q: DiffusedGMM, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """grad_x log(p_t / q_t)(x) = score_p - score_q: [B, D], the exact correction discriminator guidance adds to the
    model's score."""
    return p.score(x, t) - q.score(x, t)


def mode_masses(gmm: DiffusedGMM, x: torch.Tensor, t: float | torch.Tensor = 0.0) -> torch.Tensor:
    """The fraction of samples x [N, D] whose most responsible component (under `gmm` at time t) is each k: [K]."""
    labels = gmm.responsibilities(x, t).argmax(1)
    return torch.bincount(labels, minlength=gmm.num_components).double() / x.shape[0]


def gradient_mse(true_gradient, learned_gradient, samples: torch.Tensor) -> float:
    """E_{x ~ p_t} ||true(x) - learned(x)||^2 over samples [N, D] of p_t: the discriminator's gradient error that bounds
    the guided sampler's KL (Kim et al. 2023, Thm 4; the thesis's Sec. 3.1). Both are callables x -> [N, D]."""
    return float((true_gradient(samples) - learned_gradient(samples)).pow(2).sum(1).mean())
