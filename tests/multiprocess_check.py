"""Run under `accelerate launch --multi_gpu --num_processes 2 ...`: train a tiny recipe, then compare every rank's
in-memory parameters with rank 0's, and write the verdict to OUT/verdict_rank<r>.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from rewardtune.api import make_accelerator, make_trainer, prepare_out_dir
from rewardtune.build import build_experiment
from rewardtune.recipe import load_recipe

recipe_path, out_dir, *overrides = sys.argv[1:]
out_dir = Path(out_dir)
accelerator = make_accelerator()
recipe = load_recipe(recipe_path, overrides)
if accelerator.is_main_process:
    prepare_out_dir(out_dir, recipe, resume=False, force=True)
accelerator.wait_for_everyone()
trainer = make_trainer(build_experiment(recipe), out_dir, None, accelerator)
result = trainer.fit()
flat = torch.cat([p.detach().reshape(-1) for m in trainer.modules().values() for p in m.parameters()])
reference = flat.clone()
dist.broadcast(reference, src=0)
verdict = {
    "rank": accelerator.process_index,
    "world_size": accelerator.num_processes,
    "identical_to_rank0": bool(torch.equal(flat, reference)),
    "changed_from_init": result["step"] > 0,
    "step": result["step"],
}
(out_dir / f"verdict_rank{accelerator.process_index}.json").write_text(json.dumps(verdict))
accelerator.wait_for_everyone()
accelerator.end_training()  # destroy the process group before the interpreter exits
