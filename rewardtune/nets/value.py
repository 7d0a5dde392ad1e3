"""`ValueFunction`: V_psi(x_t, t), the cost-to-go of the DxMI paper's Eq. (9), with its own optimiser.

A time-dependent value evaluates a network on (x, t); a time-independent one (Algorithm 2) ignores t. A conditional
value V(x, t, c) also gives the network the chain's condition (`conditions.Conditions`) as `c=` its tensor.
The value owns its `GradStep` so that an energy sharing its network (V^T = E) can share the optimiser too.
"""

from __future__ import annotations

import torch
from torch import nn

from rewardtune.conditions import Conditions, condition_tensor
from rewardtune.nets.conditioning import Conditioning
from rewardtune.optim import GradStep
from rewardtune.precision import at_least_fp32


class ValueFunction(nn.Module):
    """V(x, t, c) -> [B] for per-sample integer times t [B] (t = T is the terminal value) and conditions c (B rows or
    None).

    Args:
        net: module called as net(x, t_float) (time-dependent) or net(x) (time-independent), returning [B] or [B, 1];
            a conditional one also takes the keyword `c`, the condition tensor (None: "no condition").
        lr: Adam learning rate of the value's optimiser.
        time_dependent: whether t is passed to the network.
        grad_clip: optional gradient-norm clip.
        conditioning: the condition `net` takes (None: unconditional).
        integer_times: pass t to `net` as the int64 times themselves instead of floats (a net that takes them, such
            as a `TimeMLP` with a `time_table`, which looks their embeddings up).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        lr: float,
        time_dependent: bool = True,
        grad_clip: float | None = None,
        conditioning: Conditioning | None = None,
        integer_times: bool = False,
    ):
        super().__init__()
        self.net = net
        self.time_dependent = time_dependent
        self.integer_times = integer_times
        self.conditioning = conditioning
        self.optimizer = GradStep([(self.net.parameters(), lr)], grad_clip=grad_clip)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        args = ((x, t if self.integer_times else t.float()) if self.time_dependent else (x,))
        if condition is None:
            return at_least_fp32(self.net(*args).view(-1))  # TD targets are fp32 under bf16/fp16 autocast
        if self.conditioning is None:
            raise ValueError("this value function is unconditional but was given conditions")
        return at_least_fp32(self.net(*args, c=condition_tensor(condition)).view(-1))


def build_time_mlp_value(
    sample_shape: tuple[int, ...],
    conditioning: Conditioning | None = None,
    num_steps: int | None = None,
    /,
    *,
    hidden: int = 128,
    depth: int = 3,
    time_dim: int = 128,
    time_dependent: bool = True,
    lr: float = 1e-3,
    grad_clip: float | None = None,
) -> ValueFunction:
    """Value `time_mlp`: a time-conditioned MLP V(x, t) (time_dependent = false drops the time input); V(x, t, c)
    with the condition's embedding concatenated when the run is conditional. Given the sampler's `num_steps` T, the
    network looks the embeddings of t = 0..T up in a table (`TimeMLP.time_table`) instead of computing them."""
    from rewardtune.nets.mlp import TimeMLP

    dim = 1
    for s in sample_shape:
        dim *= s
    table = num_steps + 1 if num_steps is not None and time_dependent else 0
    net = TimeMLP(dim, 1, hidden=hidden, depth=depth, time_dim=time_dim if time_dependent else 0, conditioning=conditioning,
                  time_table=table)
    return ValueFunction(net, lr=lr, time_dependent=time_dependent, grad_clip=grad_clip, conditioning=conditioning,
                         integer_times=table > 0)
