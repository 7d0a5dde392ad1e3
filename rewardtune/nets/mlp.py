"""Time-conditioned MLP (the DxMI paper's 2D and anomaly-detection networks, Appendix C.3).

The input x is concatenated with a sinusoidal embedding of the (possibly fractional) time, and for a conditional
network with an embedding of the condition (`nets.conditioning.ConditionEmbedding`), and passed through an MLP.
A network that is called with the few integer times 0..n-1 (a value V(x, t), t = 0..T) can look their embeddings up
in a table instead of computing them at every call (`time_table`).
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
        time_table: n > 0: integer (int64) times t, which must then lie in 0..n-1, take their embedding rows from a
            table of emb(k * time_scale), k = 0..n-1, made once per device and dtype with the same arithmetic (so the
            same numbers, bit for bit); floating-point times are embedded as usual. 0: no table.
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
        time_table: int = 0,
    ) -> None:
        super().__init__()
        if time_table < 0:
            raise ValueError(f"time_table must be >= 0, got {time_table}")
        self.time_scale = time_scale
        self.embed = SinusoidalTimeEmbedding(time_dim) if time_dim > 0 else None
        self.time_table = time_table if self.embed is not None else 0
        self.tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # not state: derived from the sizes
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
            h = torch.cat([h, self.time_embedding(t)], dim=1)
        if self.condition is not None:
            h = torch.cat([h, self.condition(c, h.shape[0], h.device)], dim=1)
        elif c is not None:
            raise ValueError("this TimeMLP is unconditional but was given a condition")
        return self.body(h)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """emb(t * time_scale): [B, time_dim] for times t [B]; integer times from the table when there is one."""
        if not self.time_table or t.is_floating_point():
            return self.embed(t * self.time_scale)
        freqs = self.embed.freqs
        table = self.tables.get((freqs.device, freqs.dtype))
        if table is None:
            with torch.no_grad():  # what `embed` computes for the int64 times 0..n-1, row by row
                table = self.embed(torch.arange(self.time_table, device=freqs.device) * self.time_scale)
            self.tables[(freqs.device, freqs.dtype)] = table
        return torch.index_select(table, 0, t)  # an index outside 0..n-1 raises
