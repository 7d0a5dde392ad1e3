#!/bin/bash
# Class-conditional DxMI on the digits (docs/results.md, issue W2 3/8): for each seed, the class-conditional DDPM
# (ddpm_digits_cond.toml), then DxMI at T = 4 with a class-conditional energy from it, without classifier-free
# guidance (cfg_scale = 1) and with the recipe's guidance (cfg_scale = 1.5). Runs go JOBS at a time (default 2; one
# thread each). `rewardtune report RUNS/cond` tabulates.
#   JOBS=2 bash scripts/conditional_digits_runs.sh [RUNS_ROOT] [SEEDS...]      # defaults: runs, seeds 0 1 2
set -uo pipefail
root=${1:-runs}; shift || true
seeds=${*:-0 1 2}
source "$(dirname "$0")/run_all.sh"
for s in $seeds; do echo "recipes/ddpm_digits_cond.toml --seed $s --out $root/cond/pretrain_s$s"; done | run_all
for s in $seeds; do
  init="--seed $s --set backbone.init_from=$root/cond/pretrain_s$s"
  echo "recipes/dxmi_digits_cond.toml $init --out $root/cond/dxmi_digits_cond_s$s"
  echo "recipes/dxmi_digits_cond.toml $init --set backbone.cfg_scale=1.0 --out $root/cond/dxmi_digits_cond_w1_s$s"
done | run_all
