"""Run under `accelerate launch --multi_gpu --num_processes 2 ...`: train a conditional policy-gradient recipe with
per-condition advantage statistics, then write each rank's statistics buffers and rollout prompts to
OUT/conditions_rank<r>.json, so the test can check that the ranks standardised with the same statistics."""

import json
import sys
from pathlib import Path

from rewardtune.api import make_accelerator, make_recipe, make_trainer
from rewardtune.build import build_experiment

out_dir = Path(sys.argv[1])
tables = {
    "data": {"kind": "8gaussians"},
    "conditions": {"kind": "prompts", "prompts": ["left", "right", "up", "down"], "text_encoder": {"kind": "hash", "dim": 8}},
    "backbone": {"kind": "mlp", "num_steps": 3, "hidden": 32, "depth": 2, "time_dim": 16},
    "reward": {"kind": "recording_rewards:build_context_free_reward"},
    "algorithm": {"kind": "policy_gradient", "sampler_lr": 1e-3, "advantage": "per_condition", "stat_min_count": 2,
                  "stat_buffer_size": 8},
    "train": {"steps": 4, "batch_size": 16, "log_every": 1, "checkpoint_every": 10},
    "eval": {"num_samples": 64, "repeats": 1, "plot": False},
}
accelerator = make_accelerator()
trainer = make_trainer(build_experiment(make_recipe(tables)), None, None, accelerator)
trainer.fit()
buffers = {key: rows.tolist() for key, rows in trainer.algorithm.stats.state_dict().items()}
(out_dir / f"conditions_rank{accelerator.process_index}.json").write_text(json.dumps({"buffers": buffers}))
accelerator.wait_for_everyone()
accelerator.end_training()
