"""Networks: time embeddings and time-conditioned MLPs."""

from rewardtune.nets.mlp import SinusoidalTimeEmbedding, TimeMLP

__all__ = ["SinusoidalTimeEmbedding", "TimeMLP"]
