"""Time-conditioned MLP (the DxMI paper's 2D and anomaly-detection networks, Appendix C.3).

The input x is concatenated with a sinusoidal embedding of the (possibly fractional) time, and for a conditional
network with an embedding of the condition (`nets.conditioning.ConditionEmbedding`), and passed through an MLP.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rewardtune.nets.conditioning import ConditionEmbedding, Conditioning


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of scalar times: [B] -> [B, dim]."""

    def __init__(self, dim: int = 128, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None, :]  # [B, dim/2]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class TimeMLP(nn.Module):
    """f(x, t, c) = MLP([flatten(x), emb(t * time_scale), emb(c)]) with SiLU activations.

    Args:
        in_dim: flattened input size D.
        out_dim: output size (D for an eps-network, 1 for a value/energy).
        hidden: width of every hidden layer.
        depth: number of hidden layers.
        time_dim: size of the sinusoidal time embedding (0 makes the network time-independent).
        time_scale: multiplies t before embedding (spreads small integer times over the embedding's frequencies).
        conditioning: the condition the network takes (None: unconditional, the network of earlier releases).
        condition_dim: size of the condition embedding.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden: int = 128,
        depth: int = 3,
        time_dim: int = 128,
        time_scale: float = 1.0,
        conditioning: Conditioning | None = None,
        condition_dim: int = 128,
    ) -> None:
        super().__init__()
        self.time_scale = time_scale
        self.embed = SinusoidalTimeEmbedding(time_dim) if time_dim > 0 else None
        self.condition = ConditionEmbedding(conditioning, condition_dim) if conditioning is not None else None
        layers: list[nn.Module] = []
        width = in_dim + max(time_dim, 0) + (condition_dim if conditioning is not None else 0)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, ...], t [B] (or a scalar), c: the condition tensor (None: "no condition") -> [B, out_dim]."""
        h = x.flatten(1)  # [B, D]
        if self.embed is not None:
            if t is None:
                raise ValueError("this TimeMLP is time-conditioned: pass t")
            t = t.expand(h.shape[0]) if t.dim() == 0 else t
            h = torch.cat([h, self.embed(t * self.time_scale)], dim=1)
        if self.condition is not None:
            h = torch.cat([h, self.condition(c, h.shape[0], h.device)], dim=1)
        elif c is not None:
            raise ValueError("this TimeMLP is unconditional but was given a condition")
        return self.body(h)
