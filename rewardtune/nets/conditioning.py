"""How networks take a condition: the `Conditioning` a run declares, the `ConditionEmbedding` every conditional
network uses, and classifier-free guidance.

A conditional network is called as net(x, t, c) with c = `Conditions.tensor()`: class labels int64 [B] (NULL_LABEL
for "no condition") or text embeddings float [B, E] (zero rows for "no condition"); net(x, t) with no c is the
unconditional branch. The embedding of "no condition" is learned for labels (an extra row of the table) and is the
projection's bias for text (the projection of the zero vector).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rewardtune.conditions import NULL_LABEL


@dataclass(frozen=True)
class Conditioning:
    """What condition a run's networks take: `num_classes` class labels, or text embeddings of size `text_dim`."""

    num_classes: int | None = None
    text_dim: int | None = None

    def __post_init__(self) -> None:
        if (self.num_classes is None) == (self.text_dim is None):
            raise ValueError("Conditioning takes exactly one of num_classes and text_dim")
        size = self.num_classes if self.num_classes is not None else self.text_dim
        if size < 1:
            raise ValueError(f"Conditioning sizes must be positive, got {self}")

    def describe(self) -> str:
        return f"{self.num_classes} class labels" if self.num_classes is not None else f"{self.text_dim}-d text embeddings"


class ConditionEmbedding(nn.Module):
    """c -> [B, dim]: a label table with one extra row for "no condition", or a linear map of text embeddings.

    Args:
        conditioning: what the condition is.
        dim: the embedding size (a network adds it to, or concatenates it with, its time embedding).
        zero_init: start at zero output for every condition, so a pretrained unconditional network given this
            embedding starts out computing exactly what it computed before.
    """

    def __init__(self, conditioning: Conditioning, dim: int, *, zero_init: bool = False) -> None:
        super().__init__()
        self.conditioning = conditioning
        if conditioning.num_classes is not None:
            self.table = nn.Embedding(conditioning.num_classes + 1, dim)  # row K: "no condition"
            if zero_init:
                nn.init.zeros_(self.table.weight)
        else:
            self.project = nn.Linear(conditioning.text_dim, dim)
            if zero_init:
                nn.init.zeros_(self.project.weight)
                nn.init.zeros_(self.project.bias)

    def forward(self, c: torch.Tensor | None, batch_size: int, device=None) -> torch.Tensor:
        """Embeddings [B, dim] of conditions `c` (None: "no condition" for all `batch_size` rows)."""
        k = self.conditioning.num_classes
        if k is not None:
            if c is None:
                c = torch.full((batch_size,), NULL_LABEL, dtype=torch.long, device=device or self.table.weight.device)
            if c.dtype != torch.long:
                raise ValueError(f"this network takes class labels (int64), got {c.dtype} conditions")
            if bool(((c < NULL_LABEL) | (c >= k)).any()):
                raise ValueError(f"class labels must be in 0..{k - 1} (or {NULL_LABEL}: none), got {c.tolist()[:8]}")
            return self.table(torch.where(c == NULL_LABEL, torch.full_like(c, k), c))
        if c is None:
            c = torch.zeros(batch_size, self.conditioning.text_dim, device=device or self.project.weight.device)
        if not c.dtype.is_floating_point or c.dim() != 2 or c.shape[1] != self.conditioning.text_dim:
            raise ValueError(f"this network takes [B, {self.conditioning.text_dim}] text embeddings, got {c.dtype} {tuple(c.shape)}")
        return self.project(c.to(self.project.weight.dtype))


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """out_uncond + w (out_cond - out_uncond) (Ho & Salimans 2022, Eq. (6) with w = 1 + their guidance weight):
    w = 1 is the conditional network, w = 0 the unconditional one."""
    return unconditional + scale * (conditional - unconditional)


def guided_call(net: nn.Module, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None, scale: float) -> torch.Tensor:
    """net(x, t, c) with classifier-free guidance at CFG scale `scale`: the conditional and unconditional branches in
    one batch of 2B (c None: net(x, t), unguided)."""
    if c is None:
        return net(x, t)
    if scale == 1.0:
        return net(x, t, c)
    null = torch.full_like(c, NULL_LABEL) if c.dtype == torch.long else torch.zeros_like(c)
    both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, null]))
    conditional, unconditional = both.chunk(2)
    return classifier_free_guidance(conditional, unconditional, scale)
