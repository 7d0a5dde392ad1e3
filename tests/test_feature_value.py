"""Value `features`: a head on a frozen, differentiable trunk (nets/feature_value.py)."""

from __future__ import annotations

import pytest
import torch

from rewardtune.conditions import Conditions
from rewardtune.data.shapes import all_scenes, degrade, render_many
from rewardtune.errors import PluginError
from rewardtune.nets.conditioning import Conditioning
from rewardtune.nets.feature_value import build_feature_value
from rewardtune.registry import VALUES
from rewardtune.rewards.shapes import verify
from rewardtune.text_encoders import HashTextEncoder


def test_trunk_is_frozen_gradients_reach_the_input_and_it_stays_in_eval_mode():
    torch.manual_seed(0)
    value = VALUES.get("features")((3, 16, 16), 4, None, trunk="shapes", hidden=32)
    trunk = {k: v.clone() for k, v in value.net.trunk.state_dict().items()}
    x = torch.randn(4, 3, 16, 16).clamp(-1, 1).requires_grad_(True)
    loss = value(x, torch.full((4,), 4)).square().mean()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # policy improvement differentiates V in x
    value.optimizer.step(value(x.detach(), torch.full((4,), 4)).square().mean())
    for key, weight in value.net.trunk.state_dict().items():
        torch.testing.assert_close(weight, trunk[key], rtol=0, atol=0)
    assert not any(p.requires_grad for p in value.net.trunk.parameters())
    value.train()
    assert not value.net.trunk.training and value.net.training


def test_a_conditional_feature_value_learns_the_verifier_from_few_images():
    """On degraded renders under their own caption or a mismatched one, the head learns the verifier's fraction of
    checks passed: on held-out images its squared error is well under the targets' variance (0.063 against 0.138
    when measured; 0.32 under shuffled captions), because the trunk already reads colour, shape and position and
    only the head is trained."""
    torch.manual_seed(0)
    scenes = all_scenes()
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(0, len(scenes), (2048,), generator=gen).tolist()
    images = degrade(render_many([scenes[i] for i in index], 16, gen), gen)
    asked = [scenes[i if k % 2 == 0 else (i + 7 * k) % len(scenes)] for k, i in enumerate(index)]  # half mismatched
    target = verify(images, [s.metadata() for s in asked])[1]["fraction"]
    encoder = HashTextEncoder(dim=64)
    condition = encoder.encode_conditions(Conditions.from_prompts([s.caption() for s in asked]))
    value = build_feature_value((3, 16, 16), 4, Conditioning(text_dim=64), trunk="shapes", hidden=256, lr=1e-3)
    t = torch.full((2048,), 4)
    for step in range(1000):
        rows = torch.randint(0, 1536, (64,), generator=torch.Generator().manual_seed(step))
        value.optimizer.step((value(images[rows], t[rows], condition.select(rows)) - target[rows]).square().mean())
    with torch.no_grad():
        held = torch.arange(1536, 2048)
        error = (value(images[held], t[held], condition.select(held)) - target[held]).square().mean()
        blind = (value(images[held], t[held], condition.select(held.flip(0))) - target[held]).square().mean()
    assert error < 0.6 * target[held].var()
    assert blind > 1.5 * error  # it reads the prompt: the wrong captions' values miss


def test_bad_trunks_are_plugin_errors():
    with pytest.raises(PluginError, match="reads RGB images 3xSxS"):
        build_feature_value((1, 8, 8), 4, None, trunk="shapes")
    with pytest.raises(PluginError, match="unknown trunk 'clip'"):
        build_feature_value((3, 16, 16), 4, None, trunk="clip")
    with pytest.raises(PluginError, match="not a torch.nn.Module"):
        build_feature_value((3, 16, 16), 4, None, trunk="builtins:dict")


def test_the_step_embedding_separates_steps_and_time_independence_drops_it():
    torch.manual_seed(0)
    value = build_feature_value((3, 16, 16), 4, None, trunk="shapes", hidden=32)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    at = [value(x, torch.full((3,), t)) for t in range(5)]
    assert all(not torch.allclose(at[0], at[t]) for t in range(1, 5))
    target = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]).repeat_interleave(3)  # a cost-to-go that only the step explains
    xs, ts = x.repeat(5, 1, 1, 1), torch.arange(5).repeat_interleave(3)
    for _ in range(300):
        value.optimizer.step((value(xs, ts) - target).square().mean())
    assert (value(xs, ts) - target).abs().max() < 0.1
    still = build_feature_value((3, 16, 16), 4, None, trunk="shapes", hidden=32, time_dependent=False)
    torch.testing.assert_close(still(x, torch.zeros(3)), still(x, torch.full((3,), 4)), rtol=0, atol=0)


def test_the_default_shapes_trunk_is_not_the_evaluation_network(tmp_path, monkeypatch):
    import rewardtune.nets.shapes as shapes_nets

    monkeypatch.setenv("REWARDTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(shapes_nets, "STEPS", 20)  # token training runs: the test is about which network is used
    monkeypatch.setattr(shapes_nets, "POOL_SIZE", 200)
    value = build_feature_value((3, 16, 16), 4, None, trunk="shapes")
    evaluation = shapes_nets.load_shapes_classifier(16)  # the seed-0 network of eval.feature_extractor = "shapes"
    trunk = value.net.trunk.classifier
    assert not torch.equal(trunk.conv1.weight, evaluation.conv1.weight)
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    version = shapes_nets.VERSION
    assert names == [f"shapes_classifier_v{version}_16.safetensors", f"shapes_classifier_v{version}_16_seed1.safetensors"]
    same = build_feature_value((3, 16, 16), 4, None, trunk="shapes", trunk_seed=0).net.trunk.classifier
    torch.testing.assert_close(same.conv1.weight, evaluation.conv1.weight, rtol=0, atol=0)
