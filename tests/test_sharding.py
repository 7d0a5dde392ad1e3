"""FSDP settings from an accelerate launch (`sharding.py`); the 2-process run itself is in test_latent.py
(`test_two_processes_train_an_sd_lora_recipe_sharded_as_they_do_data_parallel`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rewardtune.errors import RecipeError
from rewardtune.sharding import (
    DEFAULT_BLOCKS,
    ShardingPlan,
    full_tensors,
    holds_sharded,
    shard_like,
    shard_units,
    sharding_plan,
)

CPU_LAUNCH = SimpleNamespace(distributed_type=SimpleNamespace(name="MULTI_CPU"), state=SimpleNamespace(),
                             device=torch.device("cpu"))
"""What `accelerate launch --config_file recipes/accelerate/fsdp.yaml` gives CPU processes: distributed type MULTI_CPU
(accelerate converts only GPU types to FSDP) and the FSDP settings in the environment."""

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false",
            "FSDP_ACTIVATION_CHECKPOINTING": "false"}


@pytest.fixture
def fsdp_env(monkeypatch):
    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    return monkeypatch


def test_no_fsdp_launch_no_plan(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert sharding_plan(CPU_LAUNCH) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert sharding_plan(CPU_LAUNCH) is None


def test_the_launch_environment_becomes_the_plan(fsdp_env):
    """On CPU processes the request lives only in the environment: it is read, not dropped."""
    plan = sharding_plan(CPU_LAUNCH)
    assert plan == ShardingPlan(blocks=None, reshard_after_forward=True, offload_policy=None)  # None: the defaults
    fsdp_env.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "JointTransformerBlock,ResnetBlock2D")
    fsdp_env.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")  # SHARD_GRAD_OP, fsdp_shard_grad_op.yaml
    plan = sharding_plan(CPU_LAUNCH)
    assert plan.blocks == ("JointTransformerBlock", "ResnetBlock2D") and plan.reshard_after_forward is False
    fsdp_env.setenv("FSDP_AUTO_WRAP_POLICY", "NO_WRAP")
    assert sharding_plan(CPU_LAUNCH).blocks == ()  # the network as one unit


@pytest.mark.parametrize(("key", "value", "message"), [
    ("FSDP_VERSION", "1", "set fsdp_version: 2"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "true", "backbone.gradient_checkpointing"),
    ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "SIZE_BASED_WRAP is not supported"),
])
def test_settings_the_trainer_would_not_apply_are_refused_in_one_line(fsdp_env, key, value, message):
    fsdp_env.setenv(key, value)
    with pytest.raises(RecipeError, match=message) as caught:
        sharding_plan(CPU_LAUNCH)
    assert "\n" not in str(caught.value)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)


class Policy(nn.Module):
    network_name = "eps_net"

    def __init__(self):
        super().__init__()
        self.eps_net = nn.Sequential(Block(), nn.ReLU(), Block())


def test_the_units_are_the_named_blocks_of_the_backbones_network():
    policy = Policy()
    network, blocks = shard_units(policy, ShardingPlan(blocks=("Block",)), policy)
    assert network is policy.eps_net and blocks == [policy.eps_net[0], policy.eps_net[2]]
    network, blocks = shard_units(policy, ShardingPlan(blocks=None), policy)  # default blocks: none in an MLP
    assert network is policy.eps_net and blocks == [] and "ResnetBlock2D" in DEFAULT_BLOCKS
    with pytest.raises(RecipeError, match="names Attention, which the backbone's network .Sequential. does not"):
        shard_units(policy, ShardingPlan(blocks=("Attention",)), policy)
    with pytest.raises(RecipeError, match="has no network module to shard"):
        shard_units(nn.Linear(2, 2), ShardingPlan(blocks=None), nn.Linear(2, 2))


def test_the_sd_unets_default_blocks_are_its_resnets_and_transformer_blocks(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2)
    owner = SimpleNamespace(network_name="eps_net", eps_net=unet)
    _, blocks = shard_units(owner, ShardingPlan(blocks=None), owner)
    kinds = {type(b).__name__ for b in blocks}
    assert kinds == {"ResnetBlock2D", "BasicTransformerBlock"}
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    assert in_blocks > 0.7 * sum(p.numel() for p in unet.parameters())  # most of the weights shard block by block


def test_plain_tensors_pass_through_the_gather_and_the_cut():
    state = {"a": torch.ones(2), "b": [torch.zeros(3), 4], "c": "x"}
    assert not holds_sharded(state)
    gathered = full_tensors(state)
    assert gathered["a"] is state["a"] and gathered["b"][0] is state["b"][0] and gathered["b"][1] == 4
    full = torch.arange(4.0)
    assert shard_like(full, torch.zeros(4)) is full
