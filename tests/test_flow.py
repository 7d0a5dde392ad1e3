"""The flow-matching backbone (backbones/flow.py) and its pretraining algorithm (algorithms/flow_matching.py):
SD3's level grid, the flow SDE's marginals on a Gaussian with the exact velocity, log-probs against
torch.distributions, CFG, the flow-matching loss, and recipes that run end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from rewardtune.algorithms.flow_matching import (
    FlowMatchingPretrain,
    build_flow_matching,
    flow_matching_loss,
)
from rewardtune.api import build_trainer, make_recipe
from rewardtune.backbones.flow import (
    FlowChainPolicy,
    build_flow_backbone,
    flow_levels,
    flow_sde_transition,
)
from rewardtune.conditions import Conditions
from rewardtune.errors import RecipeError
from rewardtune.nets.conditioning import Conditioning

TINY_UNET = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
             "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4}


# ---- the level grid ------------------------------------------------------------------------------------------------
def test_levels_are_even_and_shifted_as_diffusers_flow_scheduler_shifts_them():
    torch.testing.assert_close(flow_levels(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])  # the same raw grid, shifted by the scheduler
        torch.testing.assert_close(flow_levels(4, shift), scheduler.sigmas.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flow_levels(4, 3.0)[:4], torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64))
    for bad in ({"num_steps": 0}, {"num_steps": 4, "shift": 0.0}):
        with pytest.raises(ValueError):
            flow_levels(**bad)


def test_sde_coefficients_follow_the_formula_and_reduce_to_euler_without_noise():
    levels = flow_levels(4)
    coef = flow_sde_transition(levels, noise_level=0.7)
    s, dt = 0.5, -0.25  # step 2
    g = 0.7 * math.sqrt(s / (1 - s))
    assert math.isclose(coef.a[2], 1 + g**2 * dt / (2 * s), rel_tol=1e-12)
    assert math.isclose(coef.b[2], (1 + g**2 * (1 - s) / (2 * s)) * dt, rel_tol=1e-12)
    assert math.isclose(coef.sigma[2], g * math.sqrt(-dt), rel_tol=1e-12)
    g0 = 0.7 * math.sqrt(0.75 / 0.25)  # at s = 1 the next level's g
    assert math.isclose(coef.sigma[0], g0 * math.sqrt(0.25), rel_tol=1e-12) and math.isclose(coef.b[0], -0.25)
    ode = flow_sde_transition(levels, noise_level=0.0)
    torch.testing.assert_close(ode.a, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(ode.b, levels[1:] - levels[:-1])
    with pytest.raises(ValueError, match="decrease"):
        flow_sde_transition(torch.tensor([0.0, 0.5, 1.0]))


# ---- marginals of the chain on a Gaussian, with the exact velocity ------------------------------------------------
MU, TAU = 1.5, 0.4  # data ~ N(MU, TAU^2) in every dimension


def exact_velocity_coefficients(s: float) -> tuple[float, float]:
    """v(x, s) = k x + c, the exact velocity E[eps - x0 | x_s = x] of Gaussian data under x_s = (1 - s) x0 + s eps."""
    m, var = (1 - s) * MU, (1 - s) ** 2 * TAU**2 + s**2
    k = (s - (1 - s) * TAU**2) / var
    return k, -k * m - MU


class ExactVelocity(nn.Module):
    """The exact velocity as a network of (x, timestep = 1000 s)."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        s = (timestep / 1000).double().view(-1, 1)
        m, var = (1 - s) * MU, (1 - s) ** 2 * TAU**2 + s**2
        k = (s - (1 - s) * TAU**2) / var
        return (k * (x.double() - m) - MU).to(x.dtype)


class ShiftedVelocity(ExactVelocity):
    """The exact velocity plus 0.1."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return super().forward(x, timestep) + 0.1


def propagate(num_steps: int, noise_level: float) -> list[tuple[float, float]]:
    """The chain's exact marginal (mean, variance) at every level: the mean a x + b (k x + c) is linear in x."""
    coef = flow_sde_transition(flow_levels(num_steps), noise_level)
    mean, var, out = 0.0, 1.0, [(0.0, 1.0)]
    for t in range(num_steps):
        k, c = exact_velocity_coefficients(float(coef.level[t]))
        gain = float(coef.a[t] + coef.b[t] * k)
        mean, var = gain * mean + float(coef.b[t]) * c, gain**2 * var + float(coef.sigma[t]) ** 2
        out.append((mean, var))
    return out


def marginal_error(num_steps: int, noise_level: float, levels_from: int = 0) -> float:
    """The largest |mean error| + |variance error| of the chain against x_s ~ N((1 - s) MU, (1 - s)^2 TAU^2 + s^2),
    over the levels from index `levels_from` on."""
    pairs = list(zip(propagate(num_steps, noise_level), flow_levels(num_steps).tolist()))[levels_from:]
    return max(abs(mean - (1 - s) * MU) + abs(var - ((1 - s) ** 2 * TAU**2 + s**2)) for (mean, var), s in pairs)


def test_the_ode_keeps_the_data_marginals_at_every_level_as_steps_shrink():
    errors = [marginal_error(num_steps, 0.0) for num_steps in (10, 100, 1000)]
    assert errors[2] < 1e-3 and errors[2] < errors[1] < errors[0]


def test_the_sde_ends_at_the_data_marginal_as_steps_shrink():
    """With noise the discretisation overshoots the variance just below s = 1, where g diverges (by about 0.06-0.09
    here, whatever the step), and the later steps contract it: the final marginal is the data's to within 1e-3 from
    100 steps on (the overshoot leaves a residue of about 5e-4 that smaller steps do not remove), 0.015 at 10."""
    final = [marginal_error(num_steps, 0.7, levels_from=-1) for num_steps in (10, 100, 1000)]
    assert max(final[1:]) < 1e-3 < final[0] < 0.03
    assert marginal_error(1000, 0.7, levels_from=500) < 5e-3  # from s = 0.5 on, near the marginals


def test_the_policy_samples_the_closed_form_marginal():
    """The policy with the exact velocity network (timestep = 1000 s) samples what `propagate` computes."""
    num_steps, n = 8, 20000
    policy = FlowChainPolicy(ExactVelocity(), (2,), num_steps=num_steps, noise_level=0.7).double()
    x = policy.sample(n, torch.Generator().manual_seed(0)).final
    mean, var = propagate(num_steps, 0.7)[-1]
    assert abs(float(x.mean()) - mean) < 4 * math.sqrt(var / (2 * n))
    assert abs(float(x.var()) / var - 1) < 0.03
    assert abs(mean - MU) < 0.05 and abs(var - TAU**2) < 0.05  # eight steps already near the data


# ---- the policy's log-probs, steps and CFG ----------------------------------------------------------------------------
def conditional_flow(cfg_scale: float = 1.0) -> FlowChainPolicy:
    torch.manual_seed(0)
    policy = build_flow_backbone((3,), Conditioning(num_classes=4), num_steps=4, hidden=16, depth=2, time_dim=16,
                                 cfg_scale=cfg_scale)
    for p in policy.velocity_net.parameters():  # the condition embedding starts at zero: give it weight
        p.data.normal_(0, 0.3)
    return policy


def test_flow_log_prob_matches_torch_distributions_and_sampled_log_probs():
    policy = conditional_flow()
    x, x_next = torch.randn(8, 3), torch.randn(8, 3)
    t = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    c = Conditions.from_labels([0, 1, 2, 3, 3, 2, 1, 0])
    expected = Normal(policy.mean_at(x, t, c), policy.sigma()[t].view(-1, 1)).log_prob(x_next).sum(1)
    torch.testing.assert_close(policy.log_prob(x_next, x, t, c), expected, rtol=1e-5, atol=1e-5)
    trajectory = policy.sample(8, torch.Generator().manual_seed(1), condition=c)
    for step in range(4):
        recomputed = policy.log_prob(trajectory.states[step + 1], trajectory.states[step], torch.full((8,), step), c)
        torch.testing.assert_close(recomputed, trajectory.log_probs[step], rtol=3e-3, atol=1e-3)
    noise = torch.randn(8, 3)  # step = the reparameterised sample
    torch.testing.assert_close(policy.step(x, t, noise, c), policy.mean_at(x, t, c) + policy.sigma()[t].view(-1, 1) * noise)


def test_flow_cfg_at_scale_one_is_the_conditional_model_and_others_extrapolate():
    plain, guided = conditional_flow(1.0), conditional_flow(2.0)
    x, s, c = torch.randn(4, 3), torch.full((4,), 0.5), Conditions.from_labels([0, 1, 2, 3])
    v_c = plain.predict_velocity(x, s, c)
    v_u = plain.predict_velocity(x, s, c.null())
    torch.testing.assert_close(guided.predict_velocity(x, s, c), v_u + 2.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided.predict_velocity(x, s, c, cfg_scale=1.0), v_c)


# ---- the flow-matching loss and pretraining ------------------------------------------------------------------------
def test_flow_matching_loss_is_the_velocity_regression():
    policy = build_flow_backbone((2,), num_steps=3, hidden=16, depth=2, time_dim=16)
    x0, s = torch.randn(5, 2), torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    loss = flow_matching_loss(policy, x0, torch.Generator().manual_seed(3), levels=s)
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    x_s = (1 - s[:, None]) * x0 + s[:, None] * noise
    expected = (policy.velocity_net(x_s, 1000 * s) - (noise - x0)).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    # the exact velocity is the loss's minimiser: it beats a perturbed one on Gaussian data
    exact = FlowChainPolicy(ExactVelocity(), (2,), num_steps=3)
    data = MU + TAU * torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))

    def loss_of(policy_: FlowChainPolicy) -> float:
        return float(flow_matching_loss(policy_, data, torch.Generator().manual_seed(4)))

    shifted = FlowChainPolicy(ShiftedVelocity(), (2,), num_steps=3)
    assert loss_of(exact) < loss_of(shifted) - 0.009  # the gap is 0.1^2 = 0.01 in expectation


def tables(**changes) -> dict:
    base = {
        "data": {"kind": "8gaussians"},
        "backbone": {"kind": "flow", "num_steps": 5, "hidden": 64, "depth": 2, "time_dim": 32},
        "algorithm": {"kind": "flow_matching", "lr": 2e-3},
        "train": {"steps": 300, "batch_size": 256, "log_every": 100, "checkpoint_every": 1000},
        "eval": {"num_samples": 2000, "repeats": 1, "plot": False},
    }
    base.update(changes)
    return base


def test_flow_matching_pretraining_learns_the_data():
    trainer = build_trainer(make_recipe(tables()))
    start = trainer.evaluate()["sliced_wasserstein"]
    trainer.fit()
    end = trainer.evaluate()["sliced_wasserstein"]
    assert end < 0.5 * start, (start, end)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"algorithm": {"kind": "ddpm"}}, "needs an eps-prediction backbone, got FlowChainPolicy"),
        ({"backbone": {"kind": "mlp", "num_steps": 3}}, "needs a flow backbone, got EpsilonChainPolicy"),
        ({"algorithm": {"kind": "flow_matching", "level_sampling": "beta"}}, "level_sampling: 'beta' is not one of"),
        ({"backbone": {"kind": "flow", "unet": TINY_UNET}}, "a unet needs images"),
        ({"backbone": {"kind": "flow", "shift": -1.0}}, "shift must be > 0"),
        ({"backbone": {"kind": "flow", "noise_level": -0.1}}, "noise_level must be >= 0"),
        ({"backbone": {"kind": "flow", "time_dim": 0}}, "time_dim must be >= 1"),
    ],
)
def test_a_mismatched_flow_recipe_is_a_one_line_error(change, message):
    with pytest.raises(RecipeError, match=message):
        build_trainer(make_recipe(tables(**change)))


def test_an_image_flow_backbone_pretrains_and_clamps_its_output():
    torch.manual_seed(0)
    policy = build_flow_backbone((1, 8, 8), num_steps=3, unet=TINY_UNET)
    algorithm = build_flow_matching(policy, lr=1e-3, level_sampling="logit_normal")
    assert isinstance(algorithm, FlowMatchingPretrain)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    metrics = algorithm.update(x0, None, torch.Generator().manual_seed(0))
    assert math.isfinite(metrics["flow_matching/loss"])
    x = policy.sample(3, torch.Generator().manual_seed(0)).final
    out = policy.output(x)
    assert out.shape == (3, 1, 8, 8) and float(out.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="the UNet makes 1x8x8 images"):
        build_flow_backbone((3, 8, 8), unet=TINY_UNET)
    with pytest.raises(ValueError, match="hidden is an option of the velocity MLP"):
        build_flow_backbone((1, 8, 8), unet=TINY_UNET, hidden=64)
