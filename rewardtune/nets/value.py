"""`ValueFunction`: V_psi(x_t, t), the cost-to-go of the DxMI paper's Eq. (9), with its own optimiser.

A time-dependent value evaluates a network on (x, t); a time-independent one (Algorithm 2) ignores t.
The value owns its `GradStep` so that an energy sharing its network (V^T = E) can share the optimiser too.
"""

from __future__ import annotations

import torch
from torch import nn

from rewardtune.optim import GradStep


class ValueFunction(nn.Module):
    """V(x, t) -> [B] for per-sample integer times t [B] (t = T is the terminal value).

    Args:
        net: module called as net(x, t_float) (time-dependent) or net(x) (time-independent), returning [B] or [B, 1].
        lr: Adam learning rate of the value's optimiser.
        time_dependent: whether t is passed to the network.
        grad_clip: optional gradient-norm clip.
    """

    def __init__(self, net: nn.Module, *, lr: float, time_dependent: bool = True, grad_clip: float | None = None):
        super().__init__()
        self.net = net
        self.time_dependent = time_dependent
        self.optimizer = GradStep([(self.net.parameters(), lr)], grad_clip=grad_clip)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.time_dependent:
            return self.net(x, t.float()).view(-1)
        return self.net(x).view(-1)


def build_time_mlp_value(
    sample_shape: tuple[int, ...],
    /,
    *,
    hidden: int = 128,
    depth: int = 3,
    time_dim: int = 128,
    time_dependent: bool = True,
    lr: float = 1e-3,
    grad_clip: float | None = None,
) -> ValueFunction:
    """Value `time_mlp`: a time-conditioned MLP V(x, t) (time_dependent = false drops the time input)."""
    from rewardtune.nets.mlp import TimeMLP

    dim = 1
    for s in sample_shape:
        dim *= s
    net = TimeMLP(dim, 1, hidden=hidden, depth=depth, time_dim=time_dim if time_dependent else 0)
    return ValueFunction(net, lr=lr, time_dependent=time_dependent, grad_clip=grad_clip)
