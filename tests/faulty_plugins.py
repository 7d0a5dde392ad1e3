"""Plugins of every kind that fail in their own code, or return the wrong thing, for the plugin-failure tests.

Recipes name them as `kind = "faulty_plugins:<factory>"`. A `fail_at` option makes a call site raise on its n-th
call (1: the first), so a failure can be placed in the factory, at a training step or in an evaluation. Each raises
a plain Python exception, as third-party code does (FileNotFoundError for missing weights, RuntimeError, KeyError).
The tests' folder is on sys.path under pytest; a subprocess needs PYTHONPATH=tests.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rewardtune.algorithms.dxdp import DxDP, DxDPConfig
from rewardtune.backbones.mlp import build_mlp_backbone
from rewardtune.data.toy import EightGaussians
from rewardtune.nets.value import ValueFunction, build_time_mlp_value
from rewardtune.rewards.base import Reward
from rewardtune.rewards.energy import build_energy_reward

MISSING_WEIGHTS = "no/such/dir/weights.pt"


class CallCounter:
    """Raises `error` on call number `fail_at` and after (never when fail_at is 0)."""

    def __init__(self, fail_at: int, error: Exception) -> None:
        self.fail_at, self.error, self.calls = fail_at, error, 0

    def tick(self) -> None:
        self.calls += 1
        if self.fail_at and self.calls >= self.fail_at:
            raise self.error


# ---- rewards ----------------------------------------------------------------------------------------------------
class FailingReward(Reward):
    """A ring reward whose `fail_in` call site (forward, evaluation_metrics) raises RuntimeError on call `fail_at`."""

    name = "failing"

    def __init__(self, fail_in: str, fail_at: int) -> None:
        super().__init__()
        self.fail_in = fail_in
        self.counter = CallCounter(fail_at, RuntimeError(f"{fail_in} exploded"))

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        if self.fail_in == "forward":
            self.counter.tick()
        return -(x.flatten(1).norm(dim=1) - 2.0).abs()  # [B]

    def evaluation_metrics(self, x: torch.Tensor) -> dict[str, float]:
        if self.fail_in == "evaluation_metrics":
            self.counter.tick()
        return {"ring_fraction": float((x.flatten(1).norm(dim=1) > 1).float().mean())}


def build_failing_reward(
    sample_shape: tuple[int, ...], /, *, fail_in: Literal["forward", "evaluation_metrics"] = "forward", fail_at: int = 1
) -> FailingReward:
    return FailingReward(fail_in, fail_at)


def build_reward_missing_weights(sample_shape: tuple[int, ...], /, *, weights: str = MISSING_WEIGHTS) -> Reward:
    """Opens a weights file that does not exist, as a reward whose weights were never downloaded does."""
    with open(weights, "rb") as fh:
        fh.read()
    raise AssertionError("unreachable")


def build_reward_none(sample_shape: tuple[int, ...], /) -> Reward:
    return None


def build_reward_function(sample_shape: tuple[int, ...], /) -> Reward:
    def ring(x: torch.Tensor, context=None) -> torch.Tensor:
        return -(x.flatten(1).norm(dim=1) - 2.0).abs()

    return ring


def build_failing_energy(
    sample_shape: tuple[int, ...], value, num_steps: int, /, *, fail_at: int = 1
) -> Reward:
    """The DxMI energy (its own network) whose `update` raises KeyError on call `fail_at`."""
    energy = build_energy_reward(sample_shape, value, num_steps, share_with_value=False, hidden=16, depth=1)
    counter = CallCounter(fail_at, KeyError("energy/missing"))
    update = energy.update

    def failing_update(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        counter.tick()
        return update(real, fake)

    energy.update = failing_update
    return energy


# ---- data ---------------------------------------------------------------------------------------------------------
class FailingData(EightGaussians):
    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.counter = CallCounter(fail_at, RuntimeError("data shard unreadable"))

    def sample(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        self.counter.tick()
        return super().sample(n, generator, device)


def build_failing_data(*, fail_at: int = 1) -> FailingData:
    """8 Gaussians whose `sample` raises RuntimeError on call `fail_at` (the evaluations draw data too)."""
    return FailingData(fail_at)


def build_data_missing_files(*, root: str = "no/such/data") -> EightGaussians:
    with open(f"{root}/index.json") as fh:
        fh.read()
    raise AssertionError("unreachable")


def build_data_without_shape() -> object:
    class NoShape:
        def sample(self, n, generator=None, device="cpu"):
            return torch.zeros(n, 2)

    return NoShape()


# ---- backbones ----------------------------------------------------------------------------------------------------
def build_failing_backbone(
    sample_shape: tuple[int, ...], /, *, fail_at: int = 1, num_steps: int = 3, hidden: int = 16, depth: int = 1,
    time_dim: int = 8,
):
    """The `mlp` backbone whose network raises RuntimeError on forward call `fail_at` (never when 0)."""
    policy = build_mlp_backbone(sample_shape, num_steps=num_steps, hidden=hidden, depth=depth, time_dim=time_dim)
    policy.eps_net = FailingNet(policy.eps_net, fail_at)
    return policy


class FailingNet(nn.Module):
    def __init__(self, net: nn.Module, fail_at: int) -> None:
        super().__init__()
        self.net = net
        self.counter = CallCounter(fail_at, RuntimeError("backbone network exploded"))

    def forward(self, *args):
        self.counter.tick()
        return self.net(*args)


def build_backbone_none(sample_shape: tuple[int, ...], /) -> None:
    return None


# ---- values -------------------------------------------------------------------------------------------------------
def build_failing_value(sample_shape: tuple[int, ...], /, *, fail_at: int = 1) -> ValueFunction:
    """A tiny `time_mlp` value whose network raises RuntimeError on forward call `fail_at`."""
    value = build_time_mlp_value(sample_shape, hidden=16, depth=1, time_dim=8)
    value.net = FailingNet(value.net, fail_at)
    return value


def build_value_function(sample_shape: tuple[int, ...], /):
    return lambda x, t: x.sum(1)


# ---- algorithms ---------------------------------------------------------------------------------------------------
class FailingDxDP(DxDP):
    def __init__(self, *args, fail_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counter = CallCounter(fail_at, ZeroDivisionError("division by zero"))

    def update(self, real, trajectory, generator):
        self.counter.tick()
        return super().update(real, trajectory, generator)


def build_failing_algorithm(backbone, reward, value, /, *, fail_at: int = 1) -> FailingDxDP:
    """DxDP whose `update` raises ZeroDivisionError on call `fail_at`."""
    return FailingDxDP(backbone, reward, value, config=DxDPConfig(), fail_at=fail_at)


def build_algorithm_without_update(backbone, /) -> object:
    class Idle:
        needs_rollout = False

        def modules(self):
            return {}

    return Idle()


# ---- feature extractors (eval.feature_extractor) ------------------------------------------------------------------
class WrongShapeFeatures(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images  # [B, C, H, W], not [B, F]


class FailingFeatures(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("feature network exploded")


def build_wrong_shape_features() -> nn.Module:
    return WrongShapeFeatures()


def build_failing_features() -> nn.Module:
    return FailingFeatures()


def build_flat_features() -> nn.Module:
    """A working extractor: the flattened pixels."""
    return nn.Flatten()


# ---- data of shapes the evaluators do not take --------------------------------------------------------------------
class ShapedData:
    """Zeros of a given sample shape (for the evaluators' shape checks)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.sample_shape = shape

    def sample(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        return torch.zeros(n, *self.sample_shape, device=device)


def build_scalar_data() -> ShapedData:
    return ShapedData((1,))


def build_matrix_data() -> ShapedData:
    return ShapedData((2, 2))
