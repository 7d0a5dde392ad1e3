"""f-Restart's MDP: the two actions are a Heun step and the forward kernel, episodes always end in a sample, and the
cost-to-go is the discounted sum."""

from __future__ import annotations

import pytest
import torch

from rewardtune.score_sde.gmm import DiffusedGMM
from rewardtune.score_sde.restart_control import (
    DENOISE,
    RENOISE,
    RestartController,
    RestartEnvironment,
    costs_to_go,
    renoise_fraction,
    roll_out,
)
from rewardtune.score_sde.sdes import make_sde, transition_kernel
from rewardtune.score_sde.solvers import ode_heun, time_grid

SDE = make_sde("vp")
GMM = DiffusedGMM(torch.ones(2), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([0.05, 0.05]), SDE)


def environment(horizon: int = 6) -> RestartEnvironment:
    return RestartEnvironment(SDE, GMM.score, time_grid(4, 1e-3), horizon=horizon)


def test_denoise_is_one_heun_step_and_renoise_the_forward_kernel():
    env = environment()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    level = torch.tensor([0, 2, 2, 4])
    action = torch.tensor([DENOISE, DENOISE, RENOISE, DENOISE])
    new_x, new_level = env.step(x, level, action, torch.Generator().manual_seed(1))
    assert new_level.tolist() == [1, 3, 1, 4]  # a denoise at the last level stays
    assert torch.allclose(new_x[0], ode_heun(SDE, GMM.score, x[:1], env.times[0:2])[0])
    assert torch.allclose(new_x[1], ode_heun(SDE, GMM.score, x[1:2], env.times[2:4])[0])
    assert torch.equal(new_x[3], x[3])
    m, v = transition_kernel(SDE, env.times[2], env.times[1])
    noise = torch.randn((1, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(new_x[2], m * x[2] + v.sqrt() * noise[0])


def test_episodes_end_in_samples_and_count_their_actions():
    torch.manual_seed(0)
    env = environment()
    policy = RestartController(2, hidden=8).double()
    episodes = roll_out(env, policy, 16, torch.Generator().manual_seed(0))
    assert episodes.states.shape == (6, 16, 2) and episodes.actions.shape == (6, 16) and episodes.samples.shape == (16, 2)
    assert 0 <= renoise_fraction(episodes) <= 1
    with torch.no_grad():  # always-denoise finishes exactly like the plain ODE sampler
        policy.net.body[-1].bias.copy_(torch.tensor([50.0, -50.0]))
    greedy = roll_out(env, policy, 8, torch.Generator().manual_seed(2), greedy=True)
    assert renoise_fraction(greedy) == 0.0
    start = greedy.states[0]
    assert torch.allclose(greedy.samples, ode_heun(SDE, GMM.score, start, env.times))


def test_costs_to_go_are_discounted_sums():
    costs = torch.tensor([[1.0], [2.0], [4.0]])
    assert torch.allclose(costs_to_go(costs, 0.5), torch.tensor([[1 + 1 + 1.0], [2 + 2.0], [4.0]]))


def test_a_horizon_shorter_than_the_grid_is_refused():
    with pytest.raises(ValueError, match="horizon"):
        environment(horizon=3)
