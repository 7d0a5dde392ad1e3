"""Run under `accelerate launch --config_file recipes/accelerate/fsdp.yaml ...` (2 CPU processes): train RECIPE
sharded (FSDP2, as the config file asks), the same recipe data parallel (ACCELERATE_USE_FSDP switched off for that
trainer), and the sharded run again from its second-to-last checkpoint (--resume); the main process writes what it
measured to OUT/verdict.json (and whether the data-parallel ranks hold identical parameters).

    python -m accelerate.commands.launch --config_file recipes/accelerate/fsdp.yaml tests/sharding_check.py RECIPE OUT
        [key=value ...]
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from rewardtune.api import make_accelerator, make_trainer, prepare_out_dir
from rewardtune.build import build_experiment
from rewardtune.recipe import load_recipe
from rewardtune.sharding import is_sharded

recipe_path, out_dir, *overrides = sys.argv[1:]
out_dir = Path(out_dir)
accelerator = make_accelerator()
launched_fsdp = os.environ.get("ACCELERATE_USE_FSDP") == "true"
recipe = load_recipe(recipe_path, overrides)
steps = recipe.train.steps


def train(name: str, sharded: bool, resume: bool = False):
    os.environ["ACCELERATE_USE_FSDP"] = "true" if sharded else "false"
    out = out_dir / name
    if accelerator.is_main_process and not resume:
        prepare_out_dir(out, recipe, resume=False, force=True)
    accelerator.wait_for_everyone()
    trainer = make_trainer(build_experiment(recipe), out, None, accelerator)
    trainer.fit(resume=resume)
    return trainer


fsdp = train("fsdp", sharded=True)
network = getattr(fsdp.backbone, fsdp.backbone.network_name)
sharded_params = sum(is_sharded(p) for p in network.parameters())
local = sum(p.to_local().numel() if is_sharded(p) else p.numel() for p in network.parameters())
whole = sum(p.numel() for p in network.parameters())
ema_sharded = fsdp.ema is not None and all(is_sharded(p) for p in getattr(fsdp.ema.module, fsdp.backbone.network_name).parameters())
dp = train("dp", sharded=False)
flat = torch.cat([p.detach().reshape(-1) for m in dp.modules().values() for p in m.parameters()])
reference = flat.clone()
torch.distributed.broadcast(reference, src=0)
dp_identical = bool(torch.equal(flat, reference))  # data parallel: every rank holds rank 0's parameters
if accelerator.is_main_process:  # the sharded run, rewound to its previous checkpoint
    shutil.copytree(out_dir / "fsdp", out_dir / "fsdp_resumed")
    checkpoints = out_dir / "fsdp_resumed" / "checkpoints"
    shutil.rmtree(checkpoints / f"step_{steps:08d}")
    (checkpoints / "latest").write_text(max(p.name for p in checkpoints.glob("step_*")))
    (out_dir / "fsdp_resumed" / "eval.json").unlink()
accelerator.wait_for_everyone()
train("fsdp_resumed", sharded=True, resume=True)

if accelerator.is_main_process:
    final = {name: load_file(str(out_dir / name / "checkpoints" / f"step_{steps:08d}" / "model.safetensors"))
             for name in ("fsdp", "dp", "fsdp_resumed")}
    states = {name: torch.load(out_dir / name / "checkpoints" / f"step_{steps:08d}" / "state.pt", weights_only=True)
              for name in ("fsdp", "dp")}

    def max_difference(a: dict, b: dict) -> float:
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a) if set(a) == set(b) else float("inf")

    def relative_difference(a: dict, b: dict) -> float:
        return max(((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)).item()
                   for k in a) if set(a) == set(b) else float("inf")

    def moments(state: dict) -> dict:
        return {f"{name}.{index}.{key}": value for name, opt in state["optimizers"].items()
                for index, entry in opt["state"].items() for key, value in entry.items() if value.dim() > 0}

    verdict = {
        "launched_fsdp": launched_fsdp,
        "world_size": accelerator.num_processes,
        "sharded_parameters": int(sharded_params),
        "local_fraction": local / whole,
        "ema_sharded": bool(ema_sharded),
        "same_keys": set(final["fsdp"]) == set(final["dp"]),
        "fsdp_vs_dp": max_difference(final["fsdp"], final["dp"]),
        "resumed_vs_whole": max_difference(final["fsdp_resumed"], final["fsdp"]),
        "moments_vs_dp": relative_difference(moments(states["fsdp"]), moments(states["dp"])),
        "dp_ranks_identical": dp_identical,
        "trained": max(((final["fsdp"][k].float() - v.float()).abs().max().item() for k, v in load_file(
            str(out_dir / "fsdp" / "checkpoints" / "step_00000000" / "model.safetensors")).items() if k in final["fsdp"]),
            default=0.0),
    }
    (out_dir / "verdict.json").write_text(json.dumps(verdict))
accelerator.wait_for_everyone()
accelerator.end_training()
