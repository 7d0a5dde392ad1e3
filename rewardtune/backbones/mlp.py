"""Backbone `mlp`: a time-conditioned MLP eps-network for vector data (the DxMI paper's 2D experiment)."""

from __future__ import annotations

from typing import Literal

from rewardtune.backbones.epsilon import EpsilonChainPolicy
from rewardtune.nets.conditioning import Conditioning
from rewardtune.nets.mlp import TimeMLP


def build_mlp_backbone(
    sample_shape: tuple[int, ...],
    conditioning: Conditioning | None = None,
    /,
    *,
    num_steps: int = 5,
    schedule: Literal["strided", "fastdpm"] = "strided",
    hidden: int = 128,
    depth: int = 3,
    time_dim: int = 128,
    num_train_steps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    learn_sigma: bool = True,
    fix_last_sigma: bool = False,
    sigma_floor: float = 1e-3,
    prediction: Literal["epsilon", "sample"] = "epsilon",
    cfg_scale: float = 1.0,
) -> EpsilonChainPolicy:
    """A T-step policy around TimeMLP(x, k) with a 128-d sinusoidal embedding of the DDPM timestep k.

    `schedule` picks the T-step sub-schedule of the K-step DDPM ("strided" from pure noise, or "fastdpm");
    `prediction` what the network outputs ("epsilon", or "sample" for a one-step student). The sample (`output`) is
    x_T itself: vectors have no range to clamp to. With `conditioning` (a [conditions] table) the network also takes
    the condition's embedding, and `cfg_scale` is the policy's classifier-free guidance scale.
    """
    dim = 1
    for s in sample_shape:
        dim *= s
    net = TimeMLP(dim, dim, hidden=hidden, depth=depth, time_dim=time_dim, conditioning=conditioning)
    return EpsilonChainPolicy(
        net,
        sample_shape,
        num_steps=num_steps,
        schedule=schedule,
        num_train_steps=num_train_steps,
        beta_start=beta_start,
        beta_end=beta_end,
        learn_sigma=learn_sigma,
        fix_last_sigma=fix_last_sigma,
        sigma_floor=sigma_floor,
        prediction=prediction,
        conditioning=conditioning,
        cfg_scale=cfg_scale,
    )
