"""An MLP autoencoder whose decoder manifold lies on the unit sphere (MPDR, Yoon et al. 2023; DxMI Appendix C.3).

    z = Enc(x) in R^latent,   x_hat = Dec(z) / ||Dec(z)|| in S^{D-1},   E(x) = ||x - x_hat||^2.

For x on the sphere, E(x) = 2 - 2 cos(x, x_hat) lies in [0, 4]. The reconstruction error is the energy of the
`autoencoder` reward (rewards/autoencoder.py) and the map behind the `noised_data` prior (backbones/priors.py).
"""

from __future__ import annotations

import torch
from torch import nn


def to_sphere(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """x / ||x|| along `dim`: the projection onto the unit sphere (a zero vector stays ~0, never NaN). The one
    projection the autoencoder's decoder, the sphere policy, the noised-data prior and the anomaly features use."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def mlp(in_dim: int, out_dim: int, hidden: int, depth: int) -> nn.Sequential:
    """`depth` hidden layers of width `hidden` with ReLU, then a linear output layer."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class SphereAutoencoder(nn.Module):
    """x [B, D] -> reconstruction on S^{D-1}; `energy(x)` the squared reconstruction error [B].

    Args:
        dim: D, the data's dimension.
        latent: the latent size (the paper: 128).
        hidden: width of the encoder's and the decoder's hidden layers (the paper: 1024).
        depth: hidden layers in each (the paper: 3).
        sphere: project the decoder's output onto the unit sphere (False: a plain autoencoder).
    """

    def __init__(self, dim: int, *, latent: int = 128, hidden: int = 1024, depth: int = 3, sphere: bool = True) -> None:
        super().__init__()
        self.encoder = mlp(dim, latent, hidden, depth)
        self.decoder = mlp(latent, dim, hidden, depth)
        self.sphere = sphere

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D] -> z [B, latent]."""
        return self.encoder(x.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent] -> x_hat [B, D], of unit norm when `sphere`."""
        out = self.decoder(z)
        return to_sphere(out) if self.sphere else out

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E(x) = ||x - Dec(Enc(x))||^2 summed over the D dimensions: [B]."""
        x = x.flatten(1)
        return (x - self.decode(self.encode(x))).pow(2).sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy(x)


def pretrain_autoencoder(
    model: SphereAutoencoder,
    data,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    reporter=None,
) -> list[float]:
    """Minimise the mean reconstruction error on `data.sample` batches with Adam: the autoencoder the energy starts
    from (Appendix C.3). Returns the loss every 10% of the steps; a `reporter` (a progress Reporter) shows them as a
    stage "autoencoder pretraining"."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    if reporter is not None:
        reporter.start(steps, 0, "autoencoder pretraining")
    try:
        for step in range(steps):
            x = data.sample(batch_size, generator).to(device)
            loss = model.energy(x).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (step + 1) % max(1, steps // 10) == 0:
                losses.append(loss.item())
                if reporter is not None:
                    reporter.advance(step + 1, {"autoencoder/loss": losses[-1]})
    finally:
        if reporter is not None:
            reporter.stop()
    return losses
