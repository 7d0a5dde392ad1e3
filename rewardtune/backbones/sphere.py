"""Backbone `sphere_mlp`: a T-step Gaussian policy for data on the unit sphere S^{D-1} (DxMI §5.3, Appendix C.3).

    mean_phi(x_t, t) = (x_t + f_phi(x_t, t)) / ||x_t + f_phi(x_t, t)||,   x_{t+1} = mean_phi(x_t, t) + sigma_t eps,

with f_phi a time-conditioned MLP (a 128-d sinusoidal embedding of t concatenated to x_t; the paper: 3 hidden layers
of 2048). The mean stays on the sphere ("we constrain ... the mean prediction of the sampler to remain on S^272");
the sample is `output(x_T) = x_T / ||x_T||`. f_phi's last layer starts at zero (`residual = true`), so the untrained
sampler keeps its start: with the `noised_data` prior it begins as "data plus autoencoder noise" and learns from
there; `residual = false` is the plain mean_phi = f_phi / ||f_phi|| of the paper's description.
"""

from __future__ import annotations

import torch
from torch import nn

from rewardtune.backbones.base import GaussianChainPolicy
from rewardtune.nets.autoencoder import to_sphere
from rewardtune.nets.mlp import TimeMLP


class SpherePolicy(GaussianChainPolicy):
    """A policy whose mean and sample lie on the unit sphere. `net(x [B, D], t [B]) -> [B, D]`."""

    network_name = "net"

    def __init__(
        self, net: nn.Module, dim: int, *, num_steps: int, initial_sigma: float, residual: bool = True, **policy_kwargs
    ) -> None:
        super().__init__((dim,), torch.full((num_steps,), float(initial_sigma)), **policy_kwargs)
        self.net = net
        self.residual = residual

    def mean(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[B, D], [B] integer times -> the mean on the sphere [B, D]."""
        out = self.net(x, t.to(x.dtype))
        return to_sphere(x + out if self.residual else out)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The sample: x_T projected onto the sphere, where the data live."""
        return to_sphere(x)

    def network_state(self) -> dict[str, torch.Tensor]:
        return {f"net.{k}": v for k, v in self.net.state_dict().items()}


def build_sphere_mlp_backbone(
    sample_shape: tuple[int, ...],
    /,
    *,
    num_steps: int = 5,
    hidden: int = 2048,
    depth: int = 3,
    time_dim: int = 128,
    initial_sigma: float = 0.01,
    learn_sigma: bool = True,
    residual: bool = True,
) -> SpherePolicy:
    """The sampler of the anomaly-detection experiment for vectors `sample_shape` = (D,). `initial_sigma` is the
    per-dimension noise of every step at the start (learned with `learn_sigma`); its norm is about
    initial_sigma * sqrt(D) against the sphere's radius 1. x_0 comes from the backbone's prior: N(0, I) unless the
    recipe has a [prior] table (the paper's: `noised_data`).

    Raises:
        ValueError: samples that are not vectors, non-positive sizes or sigma.
    """
    if len(sample_shape) != 1:
        raise ValueError(f"sphere_mlp takes vectors (D,), got sample shape {tuple(sample_shape)}")
    if min(num_steps, hidden, depth) < 1 or not initial_sigma > 0:
        raise ValueError("num_steps, hidden and depth must be >= 1 and initial_sigma > 0")
    dim = sample_shape[0]
    net = TimeMLP(dim, dim, hidden=hidden, depth=depth, time_dim=time_dim)
    if residual:  # f_phi = 0 at the start: the sampler begins as the identity plus noise
        last = net.body[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return SpherePolicy(net, dim, num_steps=num_steps, initial_sigma=initial_sigma, residual=residual,
                        learn_sigma=learn_sigma)
