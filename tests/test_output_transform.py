"""The sample a user gets is `backbone.output(x_T)` (image backbones: x_T clamped to [-1, 1]; vector backbones: x_T),
and every reward, metric and sampler path sees exactly that, with zero gradient outside the range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LinearPolicy, QuadraticValueNet
from test_cli import cli

from rewardtune.algorithms.dxdp import DxDP, DxDPConfig
from rewardtune.algorithms.policy_gradient import PolicyGradient, PolicyGradientConfig
from rewardtune.backbones.ddpm import build_ddpm_backbone
from rewardtune.backbones.edm import build_edm_backbone
from rewardtune.backbones.mlp import build_mlp_backbone
from rewardtune.evaluation import draw_samples
from rewardtune.nets.value import ValueFunction
from rewardtune.optim import GradStep
from rewardtune.rewards.base import Reward
from rewardtune.rewards.energy import EnergyReward
from rewardtune.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1, "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
}


class PixelSum(Reward):
    """r(x) = sum of x's coordinates: linear, so its gradient is 1 on every coordinate it sees, and any clamping
    changes its value."""

    name = "pixel_sum"

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        return x.flatten(1).sum(1)


def build_pixel_sum(sample_shape, /) -> PixelSum:
    """Reward factory for recipes: "test_output_transform:build_pixel_sum"."""
    return PixelSum()


def flat_features() -> torch.nn.Module:
    """Feature extractor for recipes: the pixels themselves."""
    return torch.nn.Flatten()


def image_policy(offset: float = 1.2, sigma: float = 0.6, shape=(1, 2, 2)) -> LinearPolicy:
    """A one-step image-like policy x_1 = offset + sigma z, clamped to [-1, 1] at the output: most pixels land above 1."""
    d = int(np.prod(shape))
    return LinearPolicy(shape, torch.zeros(1), torch.full((1, d), offset), torch.tensor([sigma]), output_range=(-1.0, 1.0))


# ---- what each backbone declares ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, shape, clamps",
    [
        (lambda: build_mlp_backbone((2,), num_steps=2, hidden=8, depth=1, time_dim=8), (2,), False),
        (lambda: build_ddpm_backbone((1, 8, 8), pretrained="", unet=TINY_UNET, num_steps=2), (1, 8, 8), True),
        (lambda: build_edm_backbone((3, 8, 8), network="helpers:tiny_edm_network", num_steps=2), (3, 8, 8), True),
    ],
    ids=["mlp", "ddpm", "edm"],
)
def test_each_backbone_declares_its_output(build, shape, clamps):
    backbone = build()
    x = torch.linspace(-3, 3, 4 * int(np.prod(shape))).view(4, *shape)
    out = backbone.output(x)
    if clamps:
        assert backbone.output_range == (-1.0, 1.0)
        torch.testing.assert_close(out, x.clamp(-1, 1), rtol=0, atol=0)
    else:
        assert backbone.output_range is None and out is x  # vectors: the identity, not even a copy


def test_output_range_must_be_ordered():
    with pytest.raises(ValueError, match="low < high"):
        image_policy().__class__((2,), torch.zeros(1), torch.zeros(1, 2), torch.ones(1), output_range=(1.0, -1.0))


# ---- rewards see the output, and nothing outside the range pushes ----------------------------------------------------
def dxdp(policy: LinearPolicy, reward: Reward, terminal: str = "value") -> DxDP:
    """DxDP without running costs (tau = 0), so the terminal term is the policy loss's only dependence on x_T."""
    d = policy.event_dim
    value = ValueFunction(QuadraticValueNet(d, policy.num_steps + 1), lr=1e-3)
    return DxDP(policy, reward, value, config=DxDPConfig(terminal=terminal, tau_entropy=0.0, tau_velocity=0.0))


def test_terminal_costs_score_the_clamped_sample():
    """DxDP's terminal cost (the value's regression target) and the policy gradient's terminal reward are the reward
    of clamp(x_T), not of the raw state."""
    policy = image_policy()
    x = policy.sample(64, torch.Generator().manual_seed(0)).final
    assert (x.abs() > 1).float().mean() > 0.5  # the raw states leave the range
    expected = x.clamp(-1, 1).flatten(1).sum(1)
    torch.testing.assert_close(dxdp(policy, PixelSum()).terminal_cost(x), -expected, rtol=0, atol=0)
    pg = PolicyGradient(policy, PixelSum(), None, config=PolicyGradientConfig())
    torch.testing.assert_close(pg.terminal_reward(x), expected, rtol=0, atol=0)


def test_knn_bonus_measures_the_clamped_samples():
    """Samples differing only outside the range are the same image: the kNN entropy bonus sees them as identical."""
    policy = image_policy()
    x = torch.tensor([[2.0, 0.1, 0.2, 0.3], [5.0, 0.1, 0.2, 0.3], [-0.5, 0.5, 0.5, 0.5]]).view(3, 1, 2, 2)
    pg = PolicyGradient(policy, PixelSum(), None, config=PolicyGradientConfig(knn_entropy=1.0, knn_k=1))
    bonus = pg.terminal_reward(x) - x.clamp(-1, 1).flatten(1).sum(1)
    assert bonus[0] == bonus[1] == pytest.approx(np.log(1e-12))  # distance 0 after clamping (floored at 1e-12)


def test_terminal_reward_has_zero_gradient_outside_the_range():
    """DxDP with terminal = "reward": the last transition back-propagates the reward of output(x_T); d loss / d noise
    = sigma * d cost / d x_T is 0 exactly on the pixels that left [-1, 1] and -sigma / N on the others."""
    policy = image_policy(offset=0.9, sigma=0.5)
    algorithm = dxdp(policy, PixelSum(), terminal="reward")
    n = 256
    x = torch.zeros(n, 1, 2, 2)
    t = torch.zeros(n, dtype=torch.long)  # T = 1: every row is the last transition
    noise = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    algorithm.policy_loss(x, t, noise).backward()
    x_next = 0.9 + 0.5 * noise.detach()
    outside = x_next.abs() > 1
    assert 0.2 < outside.float().mean() < 0.8  # both kinds of pixel are present
    grad = noise.grad
    assert torch.all(grad[outside] == 0)
    torch.testing.assert_close(grad[~outside], torch.full_like(grad[~outside], -0.5 / n))


# ---- the learning reward's update ----------------------------------------------------------------------------------
class RecordingEnergy(EnergyReward):
    """An energy that keeps the fakes its update received."""

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        self.fakes = fake.detach().clone()
        return super().update(real, fake)


class ConstantImages:
    sample_shape = (1, 2, 2)

    def sample(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        return torch.zeros(n, *self.sample_shape, device=device)


def test_learning_reward_update_sees_clamped_fakes():
    """The trainer's EBM step (Algorithm 1, line 4) contrasts data with output(x_T), the images users get."""
    torch.manual_seed(0)
    policy = image_policy()
    energy = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1))
    reward = RecordingEnergy(energy, GradStep([(energy.parameters(), 1e-3)]))
    algorithm = dxdp(policy, reward)
    trainer = Trainer(
        backbone=policy, algorithm=algorithm, reward=reward, data=ConstantImages(), evaluator=None,
        config=TrainConfig(steps=1, batch_size=64),
    )
    sampled = []
    original = policy.sample
    policy.sample = lambda *args, **kwargs: sampled.append(original(*args, **kwargs)) or sampled[-1]
    trainer.train_step()
    raw = sampled[0].final
    assert (raw.abs() > 1).any()
    torch.testing.assert_close(reward.fakes, raw.clamp(-1, 1), rtol=0, atol=0)


# ---- evaluators and `rewardtune sample` ------------------------------------------------------------------------------
def test_draw_samples_is_the_output_for_every_backbone_kind():
    """`draw_samples` (what evaluation, plots and `rewardtune sample` use) returns output(x_T): clamped images from an
    image policy, the raw x_T from a vector policy with the same chain."""
    image = image_policy()
    vector = LinearPolicy((1, 2, 2), torch.zeros(1), torch.full((1, 4), 1.2), torch.tensor([0.6]))
    drawn = {
        name: draw_samples(p, 32, torch.Generator().manual_seed(0), None, batch=10) for name, p in (("image", image), ("vector", vector))
    }
    assert drawn["vector"].max() > 1 and drawn["image"].max() <= 1
    torch.testing.assert_close(drawn["image"], drawn["vector"].clamp(-1, 1), rtol=0, atol=0)


def write_recipe(path: Path) -> Path:
    """A tiny image DxDP run: a random UNet at T = 2 on digits, scored by PixelSum."""
    import tomli_w

    recipe = {
        "data": {"kind": "digits"},
        "backbone": {"kind": "ddpm", "pretrained": "", "num_steps": 2, "unet": TINY_UNET},
        "value": {"kind": "resnet", "channels": 8},
        "reward": {"kind": "test_output_transform:build_pixel_sum"},
        "algorithm": {"kind": "dxdp", "per_dimension": True},
        "train": {"steps": 1, "batch_size": 4},
        "eval": {"num_samples": 16, "feature_extractor": "test_output_transform:flat_features", "plot": False},
    }
    path.write_text(tomli_w.dumps(recipe))
    return path


def test_training_reward_equals_the_reward_of_the_written_samples(tmp_path: Path, capsys):
    """Same checkpoint, same seed: the reward DxDP's training path computes for x_T is the reward of the images
    `rewardtune sample` writes."""
    import rewardtune as rt

    run = tmp_path / "run"
    code, _, err = cli(capsys, "run", str(write_recipe(tmp_path / "r.toml")), "--out", str(run))
    assert code == 0, err
    code, _, err = cli(capsys, "sample", str(run), "-n", "16", "--seed", "3", "-o", str(tmp_path / "s.npz"))
    assert code == 0, err
    written = torch.from_numpy(np.load(tmp_path / "s.npz")["samples"])

    trainer = rt.load_run(run)
    backbone = trainer.evaluated_backbone()
    x_T = backbone.sample(16, torch.Generator(device=backbone.device).manual_seed(3)).final
    assert (x_T.abs() > 1).any()  # the random UNet leaves the range, so raw and output rewards differ
    training_reward = -trainer.algorithm.terminal_cost(x_T)
    torch.testing.assert_close(training_reward, PixelSum()(written), rtol=0, atol=0)
    assert not torch.equal(PixelSum()(x_T), training_reward)


# ---- the terminal value stands for the reward of the output ---------------------------------------------------------
class PixelSumValue(torch.nn.Module):
    """V(x, t) = sum of x's coordinates + c at every t (c = 0, trainable so the value has an optimiser): linear, so
    clamping changes it and its gradient is 1 where it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.c = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1) + self.c


def linear_value_dxdp(policy: LinearPolicy) -> DxDP:
    value = ValueFunction(PixelSumValue(), lr=1e-3)
    return DxDP(policy, PixelSum(), value, config=DxDPConfig(tau_entropy=0.0, tau_velocity=0.0))


def test_terminal_value_reads_the_output_and_earlier_values_the_raw_state():
    """V(., T) stands for -r(output(x_T)) (with a shared energy it is E(output(x_T))): the TD target of the last
    transition reads V(clamp(x_T), T); earlier targets read the raw states x_t, t < T."""
    a, b = torch.ones(2), torch.full((2, 4), 1.2)
    policy = LinearPolicy((1, 2, 2), a, b, torch.tensor([0.3, 0.3]), output_range=(-1.0, 1.0))
    algorithm = linear_value_dxdp(policy)
    trajectory = policy.sample(32, torch.Generator().manual_seed(0))
    states = trajectory.states
    assert (states[1].abs() > 1).any() and (states[2].abs() > 1).any()
    _, _, last = algorithm.td_batch(trajectory, 1)
    torch.testing.assert_close(last, states[2].clamp(-1, 1).flatten(1).sum(1), rtol=0, atol=1e-6)
    _, _, first = algorithm.td_batch(trajectory, 0)
    torch.testing.assert_close(first, states[1].flatten(1).sum(1), rtol=0, atol=1e-6)


def test_policy_improvement_through_the_terminal_value_has_zero_gradient_outside_the_range():
    """terminal = "value" (the default): d V(output(x_T), T) / d noise is 0 on the pixels that left [-1, 1] and
    sigma / N on the others (V is the pixel sum, a cost)."""
    policy = image_policy(offset=0.9, sigma=0.5)
    algorithm = linear_value_dxdp(policy)
    n = 256
    x = torch.zeros(n, 1, 2, 2)
    t = torch.zeros(n, dtype=torch.long)  # T = 1: every row ends at T
    noise = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    algorithm.policy_loss(x, t, noise).backward()
    outside = (0.9 + 0.5 * noise.detach()).abs() > 1
    assert 0.2 < outside.float().mean() < 0.8
    assert torch.all(noise.grad[outside] == 0)
    torch.testing.assert_close(noise.grad[~outside], torch.full_like(noise.grad[~outside], 0.5 / n))
