"""The reward contract.

A reward scores final samples x_T: `reward(x, context) -> Tensor[B]`, higher is better. Rewards say whether they are
`differentiable` (policy improvement may back-propagate through them) and whether they `learns` (they are trained
against the sampler, like DxMI's energy; such a reward implements `update(real, fake) -> metrics`).
The cost seen by the control problem (the DxMI paper's terminal cost E(x_T), Eq. (8)) is `-reward`.

`check_reward_output` enforces the contract where rewards are evaluated (DxDP's terminal cost, the terms of a
composite): a Tensor of shape [B], floating point, finite. `keep_out_of_checkpoints` leaves a frozen network (CLIP,
a classifier) out of the reward's `state_dict`: the factory rebuilds it from its source, so checkpoints stay small.
docs/plugins.md is the tutorial.
"""

from __future__ import annotations

import functools
import inspect
from typing import ClassVar

import torch
from torch import nn

from rewardtune.errors import PluginError
from rewardtune.nets.frozen import keep_out_of_checkpoints  # noqa: F401  (re-exported: the plugins' import path)
from rewardtune.precision import at_least_fp32


class Reward(nn.Module):
    """Base class for rewards. Subclasses implement `forward(x, context=None) -> Tensor[B]`.

    `name` is the plugin's name in error messages (the class name when empty).
    """

    name: ClassVar[str] = ""
    differentiable: ClassVar[bool] = True
    learns: ClassVar[bool] = False
    image_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)  # the pixel range `forward` and `evaluation_metrics`
    # take images [B, C, H, W] in: samples come in [-1, 1] and are mapped affinely to it ((0, 1) for most reward
    # models' code); vectors are passed as they are

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        low, high = cls.image_range
        if not low < high:
            raise TypeError(f"{cls.__name__}.image_range must be (low, high) with low < high, got {cls.image_range}")

    def cost(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """The terminal cost -r(x, c): [B]. `context` (the samples' `Conditions`, or None) reaches `forward` only when
        there is one and `forward` takes it, so a reward written as forward(x) works in a conditional run too."""
        rewards = call_reward(self, x, context)
        if not isinstance(rewards, torch.Tensor):  # not negatable: let the contract check name the plugin
            check_reward_output(reward_name(self), rewards, x.shape[0])
        return -at_least_fp32(rewards)  # a reward computed under bf16/fp16 autocast enters the costs in fp32

    def evaluation_metrics(self, x: torch.Tensor, context=None) -> dict[str, float]:
        """Extra metrics of samples `x` that evaluators report (e.g. a classifier's target-class fraction); a
        conditional run passes each sample's condition as `context` (a reward whose override takes no `context` is
        called without it)."""
        return {}

    @property
    def reports_evaluation_metrics(self) -> bool:
        """Whether this reward has metrics of its own (overrides `evaluation_metrics`): evaluators report them even
        for a learning reward, whose `reward_mean` they leave out (it moves with the reward)."""
        return type(self).evaluation_metrics is not Reward.evaluation_metrics

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        """One training step of a learning reward (data `real` vs sampler output `fake`, both [B, ...]). In a
        conditional run the trainer calls `update(real, fake, real_condition, fake_condition)` with each side's
        `Conditions`: a conditional learning reward takes those two extra arguments (docs/plugins.md, section 6)."""
        raise NotImplementedError(f"{type(self).__name__} does not learn")

    def optimizers(self) -> list:
        """The `GradStep`s this reward owns (for checkpoints and learning-rate schedules)."""
        return []


def call_reward(reward: nn.Module, x: torch.Tensor, context=None):
    """reward(x, context), or reward(x) when there is no context or the reward's `forward` takes none; images in the
    reward's declared `image_range` (`reward_input`)."""
    x = reward_input(reward, x)
    return reward(x, context) if context is not None and takes_context(reward) else reward(x)


def reward_input(reward: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Samples as `reward` takes them: images [B, C, H, W], which come in [-1, 1], mapped affinely to the reward's
    `image_range` (a no-op for the default (-1, 1)); vectors unchanged. Differentiable."""
    low, high = getattr(reward, "image_range", (-1.0, 1.0))
    if x.dim() != 4 or (low, high) == (-1.0, 1.0):
        return x
    return low + (x + 1) * ((high - low) / 2)


def takes_context(reward: nn.Module) -> bool:
    """Whether `reward.forward` has a second parameter (the context) or takes *args (read once per function: rewards
    are called every iteration)."""
    forward = reward.forward
    return _takes_second_argument(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=256)
def _takes_second_argument(function) -> bool:
    params = list(inspect.signature(function).parameters.values())
    bound = 1 if params and params[0].name == "self" else 0  # an unbound method: its self is not the context
    return len(params) - bound >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def reward_name(reward: nn.Module) -> str:
    """The name a reward goes by in error messages: its `name`, or its class name."""
    return getattr(reward, "name", "") or type(reward).__name__


def reward_shares_value(reward: nn.Module | None, value: nn.Module | None) -> bool:
    """Whether `reward` is the `value` network at its terminal time (a shared DxMI energy, V(., T) = E)."""
    return value is not None and bool(getattr(reward, "shares_value", lambda v: False)(value))


def check_reward_output(name: str, rewards: object, batch_size: int) -> torch.Tensor:
    """Return `rewards` if it is a finite floating-point Tensor of shape (batch_size,); else raise PluginError.

    Args:
        name: the reward's name, quoted in the error.
        rewards: what the reward returned for a batch of `batch_size` samples.
        batch_size: B.
    """
    if not isinstance(rewards, torch.Tensor):
        raise PluginError(
            f"reward {name!r} returned a {type(rewards).__name__} for a batch of {batch_size}; "
            f"expected a Tensor of shape ({batch_size},)"
        )
    if tuple(rewards.shape) != (batch_size,):
        raise PluginError(
            f"reward {name!r} returned shape {tuple(rewards.shape)} for a batch of {batch_size}; expected ({batch_size},)"
        )
    if not rewards.dtype.is_floating_point:
        raise PluginError(f"reward {name!r} returned dtype {rewards.dtype}; expected a floating-point Tensor")
    finite = torch.isfinite(rewards)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise PluginError(f"reward {name!r} returned NaN/inf for {bad} of {batch_size} samples")
    return rewards
