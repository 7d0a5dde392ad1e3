"""Sharded training: the backbone's network under torch's FSDP2 (`fully_shard`), as an accelerate FSDP launch asks.

`accelerate launch --config_file recipes/accelerate/fsdp.yaml -m rewardtune run RECIPE` (or `--use_fsdp
--fsdp_version 2 ...`) sets the FSDP settings in the environment; `sharding_plan` reads them through accelerate's own
`FullyShardedDataParallelPlugin` (on a GPU launch, the accelerator's plugin itself; on CPU processes, where accelerate
leaves the distributed type MULTI_CPU and would otherwise drop the request, the same plugin built from the same
environment). `shard_backbone` then applies `fully_shard` bottom-up to the blocks the wrap policy names (the plugin's
`fsdp_transformer_layer_cls_to_wrap`, or the backbone's `shard_blocks` when the config names none) and to the network
itself, over a one-dimensional device mesh of all processes.

What is sharded: the backbone's denoising network (the module its `network_name` names: a UNet, an SD3 or FLUX
transformer, an MLP), and the EMA's copy of it. The value, the reward, frozen text encoders and VAEs, and a full fine-tuning run's frozen KL
reference stay replicated (they are small, or frozen and not stepped). What changes for the rest of the trainer:

- `GradStep` lets FSDP reduce-scatter (average) the sharded gradients and all-reduces only the replicated ones;
  the clipping norm counts every shard once (`optim.global_grad_norm`).
- Checkpoints are full: every rank gathers each sharded tensor (`full_tensors`, a collective) before the main
  process writes `model.safetensors` and `state.pt`, so a checkpoint of a sharded run is the same file as a
  replicated run's, loads in one process (`rewardtune sample`, `export`) and resumes at any world size; on load each
  rank keeps its own shard of the full tensors (`shard_like`).

FSDP1 (`fsdp_version: 1`), accelerate's FSDP activation checkpointing and size-based wrapping are refused in one line:
use `fsdp_version: 2`, the backbone's own `gradient_checkpointing`, and block-class wrapping.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from rewardtune.errors import RecipeError

DEFAULT_BLOCKS = (
    "ResnetBlock2D",  # diffusers UNets
    "BasicTransformerBlock",  # SD UNets' cross-attention blocks
    "JointTransformerBlock",  # SD3
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
)
"""Block classes sharded one by one when the accelerate config names none (a backbone's `shard_blocks` overrides)."""


@dataclass(frozen=True)
class ShardingPlan:
    """How to shard: the block classes wrapped one by one (None: the backbone's default), `reshard_after_forward`
    (ZeRO-3-like FULL_SHARD when true, ZeRO-2-like SHARD_GRAD_OP when false) and the offload policy (CUDA only)."""

    blocks: tuple[str, ...] | None
    reshard_after_forward: bool = True
    offload_policy: object | None = None


def fsdp_requested(accelerator) -> bool:
    """Whether this launch asked accelerate for FSDP (its distributed type, or the environment `accelerate launch`
    sets, which CPU processes keep although accelerate leaves their distributed type MULTI_CPU)."""
    kind = getattr(getattr(accelerator, "distributed_type", None), "name", "NO")
    return kind == "FSDP" or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def sharding_plan(accelerator) -> ShardingPlan | None:
    """The launch's FSDP settings as a `ShardingPlan`, or None when the launch did not ask for FSDP.

    Raises:
        RecipeError: FSDP1, accelerate's activation checkpointing, or a size-based wrap policy was asked for."""
    if not fsdp_requested(accelerator):
        return None
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is None:
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set
    if int(getattr(plugin, "fsdp_version", 1) or 1) != 2:
        raise RecipeError("rewardtune shards with FSDP2 (torch's fully_shard): set fsdp_version: 2 in the accelerate "
                          "config (or launch with --fsdp_version 2)")
    if getattr(plugin, "activation_checkpointing", False):
        raise RecipeError("accelerate's fsdp_activation_checkpointing is not applied by rewardtune: set it false and "
                          "use the backbone's own gradient checkpointing (--set backbone.gradient_checkpointing=true)")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").upper()
    if policy == "SIZE_BASED_WRAP":
        raise RecipeError("fsdp_auto_wrap_policy SIZE_BASED_WRAP is not supported: use TRANSFORMER_BASED_WRAP (with "
                          "fsdp_transformer_layer_cls_to_wrap, or none for the backbone's blocks) or NO_WRAP")
    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    blocks = () if policy == "NO_WRAP" else (tuple(names) if names else None)
    on_cuda = getattr(getattr(accelerator, "device", None), "type", "cpu") == "cuda"
    return ShardingPlan(
        blocks=blocks,
        reshard_after_forward=bool(getattr(plugin, "reshard_after_forward", True)),
        offload_policy=getattr(plugin, "cpu_offload", None) if on_cuda else None,
    )


def shard_backbone(backbone: nn.Module, plan: ShardingPlan, device: torch.device,
                   *, also: Iterable[nn.Module] = ()) -> dict[int, nn.Parameter]:
    """Shard the network `backbone.network_name` names (and the same network of each module in `also`, e.g. the EMA's
    backbone) in place.

    Returns:
        {id(parameter before): parameter after} for every parameter `fully_shard` replaced, to update optimisers that
        were built on the unsharded parameters (`swap_parameters`).

    Raises:
        RecipeError: the backbone names no network to shard, or the named block classes occur nowhere in it."""
    from torch.distributed.device_mesh import init_device_mesh

    units = [shard_units(owner, plan, backbone) for owner in (backbone, *also)]  # every check before any sharding
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    mapping: dict[int, nn.Parameter] = {}
    for network, blocks in units:
        mapping.update(shard_network(network, blocks, mesh, plan))
    return mapping


def shard_units(owner: nn.Module, plan: ShardingPlan, backbone: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """(the network `owner.network_name` names, its submodules to shard one by one).

    Raises:
        RecipeError: there is no such network, or the plan names block classes the network does not contain."""
    network = getattr(owner, getattr(owner, "network_name", "") or "network", None)
    if not isinstance(network, nn.Module):
        raise RecipeError(f"backbone {type(backbone).__name__} has no network module to shard under FSDP; "
                          "launch it data parallel (--multi_gpu)")
    blocks = plan.blocks if plan.blocks is not None else tuple(getattr(backbone, "shard_blocks", DEFAULT_BLOCKS))
    wrapped = [m for m in network.modules() if m is not network and type(m).__name__ in blocks]
    if plan.blocks and not wrapped:  # the config named classes that are not there: a typo, or another model's
        raise RecipeError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(plan.blocks)}, which the backbone's "
                          f"network ({type(network).__name__}) does not contain")
    return network, wrapped


def shard_network(network: nn.Module, blocks: list[nn.Module], mesh, plan: ShardingPlan) -> dict[int, nn.Parameter]:
    """`fully_shard` each of `blocks` (submodules of `network`; deepest first), then `network` itself."""
    from torch.distributed.fsdp import fully_shard

    before = dict(network.named_parameters())
    kwargs = {"mesh": mesh, "reshard_after_forward": plan.reshard_after_forward}
    if plan.offload_policy is not None:
        kwargs["offload_policy"] = plan.offload_policy
    for module in reversed(blocks):  # children before parents
        fully_shard(module, **kwargs)
    fully_shard(network, **kwargs)
    after = dict(network.named_parameters())
    return {id(before[name]): after[name] for name in before if name in after and after[name] is not before[name]}


def swap_parameters(optimizer: torch.optim.Optimizer, mapping: dict[int, nn.Parameter]) -> None:
    """Point `optimizer`'s parameter groups at the sharded parameters (before any state exists)."""
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(id(p), p) for p in group["params"]]


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 parameter, its gradient or its Adam moment)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensors(obj):
    """`obj` (a tensor, or dicts/lists/tuples of them) with every DTensor gathered to a full tensor.

    A collective when `obj` holds DTensors: every rank must call it with the same structure, in the same order."""
    if isinstance(obj, torch.Tensor):
        return obj.full_tensor() if is_sharded(obj) else obj
    if isinstance(obj, dict):
        return {k: full_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(full_tensors(v) for v in obj)
    return obj


def holds_sharded(obj) -> bool:
    """Whether `obj` (tensors in dicts/lists/tuples) holds any DTensor."""
    if isinstance(obj, torch.Tensor):
        return is_sharded(obj)
    if isinstance(obj, dict):
        return any(holds_sharded(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(holds_sharded(v) for v in obj)
    return False


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` as `like` holds it: this rank's shard of it when `like` is a DTensor (every rank holds `full`, so no
    communication), `full` itself otherwise."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"a tensor of shape {tuple(full.shape)} cannot load into one of shape {tuple(like.shape)}")
    return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)
