"""The hot path's shortcuts (issue 19) give the numbers of the plain paths, bit for bit: multi-tensor Adam in
`GradStep` and its checkpoints both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rewardtune.optim import GradStep


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 1))


def loss_of(net: nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(step))
    return (net(x) - x.sum(1, keepdim=True)).pow(2).mean()


# ---- GradStep: multi-tensor Adam ---------------------------------------------------------------------------------
def test_gradstep_steps_as_torchs_per_parameter_adam_does_bit_for_bit():
    net, reference = small_net(0), small_net(0)
    opt = GradStep([(net.parameters(), 1e-2)], grad_clip=0.5)
    assert opt.optimizer.param_groups[0]["foreach"] is True
    plain = torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=False)  # the loop GradStep used to run
    for step in range(5):
        opt.step(loss_of(net, step))
        plain.zero_grad()
        loss_of(reference, step).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        plain.step()
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


class LoopAdam:
    """torch's per-parameter Adam loop, which GradStep ran before, behind GradStep's step and state methods."""

    def __init__(self, params) -> None:
        self.optimizer = torch.optim.Adam(params, lr=1e-2, foreach=False)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


OPTIMISERS = {"loop": LoopAdam, "gradstep": lambda params: GradStep([(params, 1e-2)])}


@pytest.mark.parametrize(("saved_by", "loaded_by"), [("loop", "gradstep"), ("gradstep", "loop")])
def test_adam_state_loads_both_ways_between_the_loop_and_the_multi_tensor_optimiser(saved_by, loaded_by):
    """A checkpoint of the per-parameter Adam (earlier releases) resumes in today's GradStep and the other way round,
    and the resumed steps are the uninterrupted ones."""
    net = small_net(0)
    saver = OPTIMISERS[saved_by](net.parameters())
    for step in range(3):
        saver.step(loss_of(net, step))
    resumed = small_net(1)
    resumed.load_state_dict(net.state_dict())
    loader = OPTIMISERS[loaded_by](resumed.parameters())
    loader.load_state_dict(copy.deepcopy(saver.state_dict()))  # as from a file: no moments shared
    for step in range(3, 6):  # the uninterrupted run goes on with the optimiser it had
        saver.step(loss_of(net, step))
        loader.step(loss_of(resumed, step))
    for p, q in zip(net.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
