"""Run under `accelerate launch --multi_gpu --num_processes 2 ...` with PYTHONPATH=tests: each named scenario trains
a tiny digits recipe (the issue #12 setting: DDPM UNet at T = 4, policy gradient, evaluation every step) with one
rank-dependent input, and writes what this rank decided to OUT/<scenario>/rank<r>.json. Scenarios run one after
another in the same process group, so each also checks that the group is still usable after the previous one.

Usage: multiprocess_agreement.py OUT SCENARIO [SCENARIO ...]
"""

from __future__ import annotations

import copy
import json
import sys
import tomllib
from pathlib import Path

import torch
import torch.distributed as dist

from rewardtune import checkpoint as ckpt
from rewardtune.api import make_accelerator, make_trainer, prepare_out_dir
from rewardtune.build import build_experiment
from rewardtune.optim import all_mean
from rewardtune.recipe import parse_recipe

BASE = """
[run]
name = "agreement"

[data]
kind = "digits"
digit = 3

[backbone]
kind = "ddpm"
pretrained = ""
num_steps = 4
unet = { sample_size = 8, in_channels = 1, out_channels = 1, layers_per_block = 1, block_out_channels = [8, 16], down_block_types = ["DownBlock2D", "DownBlock2D"], up_block_types = ["UpBlock2D", "UpBlock2D"], norm_num_groups = 4 }

[reward]
kind = "rank_rewards:build_rank_reward"
mode = "noisy_eval"

[algorithm]
kind = "policy_gradient"
sampler_lr = 1e-6

[train]
cpu_threads = 1
steps = 4
batch_size = 16
log_every = 1
eval_every = 1
checkpoint_every = 2

[eval]
num_samples = 64
feature_extractor = "digits"
plot = false
keep_best = "reward_mean"
best_mode = "max"
"""

ISSUE_REWARD = {"kind": "composite", "normalize": True, "terms": [{"kind": "digits_classifier", "target_class": 3}]}

RANK_REWARD = "rank_rewards:build_rank_reward"
# scenario -> (reward table, [eval] overrides, what else goes wrong on rank 1: None, "rng_write" or "extra_collective")
SCENARIOS = {
    "issue": (ISSUE_REWARD, {}, None),  # each rank normalised with its own statistics: keep-best decisions differed
    "noisy_eval": ({"kind": RANK_REWARD, "mode": "noisy_eval"}, {}, None),
    "nan_reward": ({"kind": RANK_REWARD, "mode": "nan", "at": 3}, {}, None),
    "nan_metric": ({"kind": RANK_REWARD, "mode": "nan_metric", "at": 3}, {"keep_best": "frechet_distance", "best_mode": "min"}, None),
    "eval_raises": ({"kind": RANK_REWARD, "mode": "raise_eval", "at": 3}, {}, None),
    "checkpoint_fails": (ISSUE_REWARD, {}, "rng_write"),
    "extra_collective": (ISSUE_REWARD, {}, "extra_collective"),
}


def recipe_for(scenario: str):
    reward, eval_overrides, _ = SCENARIOS[scenario]
    raw = tomllib.loads(BASE)
    raw["reward"] = copy.deepcopy(reward)
    raw["eval"].update(eval_overrides)
    return parse_recipe(raw)


def break_rank1(trainer, fault: str | None) -> None:
    """Make rank 1 alone fail to write its RNG file at step 2, or run one extra collective in iteration 3."""
    if fault is None or trainer.rank != 1:
        return
    if fault == "rng_write":
        write_rng = ckpt.write_rng

        def failing_write_rng(root, step, rank, state):
            if step == 2:
                raise OSError(28, "No space left on device")
            write_rng(root, step, rank, state)

        ckpt.write_rng = failing_write_rng
    elif fault == "extra_collective":
        update = trainer.algorithm.update

        def update_with_extra_collective(real, trajectory, generator):
            if trainer.step == 2:
                all_mean(torch.zeros(3))
            return update(real, trajectory, generator)

        trainer.algorithm.update = update_with_extra_collective


def run(scenario: str, out_root: Path, accelerator) -> None:
    out_dir = out_root / scenario
    recipe = recipe_for(scenario)
    if accelerator.is_main_process:
        prepare_out_dir(out_dir, recipe, resume=False, force=True)
    accelerator.wait_for_everyone()
    trainer = make_trainer(build_experiment(recipe), out_dir, None, accelerator)
    write_rng = ckpt.write_rng
    break_rank1(trainer, SCENARIOS[scenario][2])
    try:
        result, error = trainer.fit(), None
    except Exception as err:  # noqa: BLE001 (the verdict records whatever each rank raised)
        result, error = None, f"{type(err).__name__}: {err}"
    finally:
        ckpt.write_rng = write_rng
    flat = torch.cat([p.detach().reshape(-1) for m in trainer.modules().values() for p in m.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)  # the group still works after an agreed error
    reward = trainer.reward
    verdict = {
        "rank": trainer.rank,
        "result": result,
        "error": error,
        "step": trainer.step,
        "best": trainer.best,
        "identical_to_rank0": bool(torch.equal(flat, reference)),
        "running_mean": reward.running_mean.tolist() if hasattr(reward, "running_mean") else None,
        "running_var": reward.running_var.tolist() if hasattr(reward, "running_var") else None,
    }
    (out_dir / f"rank{trainer.rank}.json").write_text(json.dumps(verdict))
    accelerator.wait_for_everyone()


def main() -> None:
    out_root, scenarios = Path(sys.argv[1]), sys.argv[2:]
    accelerator = make_accelerator()
    for scenario in scenarios:
        run(scenario, out_root, accelerator)
    accelerator.end_training()  # destroy the process group before the interpreter exits


if __name__ == "__main__":
    main()
