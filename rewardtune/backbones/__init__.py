"""Backbone adapters: pretrained networks turned into T-step Gaussian policies."""

from rewardtune.backbones.base import GaussianChainPolicy, StandardNormalPrior
from rewardtune.backbones.epsilon import EpsilonChainPolicy

__all__ = ["EpsilonChainPolicy", "GaussianChainPolicy", "StandardNormalPrior"]
