#!/bin/bash
# The digits rows of docs/results.md that depend on the fine-tuning code: for each seed, the digits DDPM pretraining,
# then DxMI at T = 4, DxDP with the digits classifier reward (beta = 0, and the KL safeguard beta = 0.064 per
# dimension), DxDP with the JPEG reward (its recipe's beta = 0.064) and the PPO baseline with the classifier reward.
# Runs go JOBS at a time (default 2; each run uses one thread on a CPU); `rewardtune report RUNS/rewards` tabulates.
#   JOBS=2 bash scripts/digits_reward_runs.sh [RUNS_ROOT] [SEEDS...]      # defaults: runs, seeds 0 1 2
set -uo pipefail
root=${1:-runs}; shift || true
seeds=${*:-0 1 2}
source "$(dirname "$0")/run_all.sh"
# 1. the pretraining that dxmi_digits.toml runs first into <out>/pretrain (the later runs reuse it)
for s in $seeds; do echo "recipes/ddpm_digits.toml --seed $s --out $root/digits/dxmi_digits_s$s/pretrain"; done | run_all
# 2. everything that starts from a seed's pretrained DDPM, safeguarded rows first
for s in $seeds; do
  init="--seed $s --set backbone.init_from=$root/digits/dxmi_digits_s$s/pretrain"
  echo "recipes/classifier_digits.toml $init --set algorithm.kl_weight=0.064 --out $root/rewards/clf_beta0.064_s$s"
  echo "recipes/jpeg_digits.toml $init --out $root/rewards/jpeg_kl0.064_s$s"
done | run_all
for s in $seeds; do
  echo "recipes/classifier_digits.toml --seed $s --set backbone.init_from=$root/digits/dxmi_digits_s$s/pretrain --out $root/rewards/clf_beta0_s$s"
  echo "recipes/dxmi_digits.toml --seed $s --out $root/digits/dxmi_digits_s$s"
done | run_all
for s in $seeds; do
  echo "recipes/pg_classifier_digits.toml --seed $s --set backbone.init_from=$root/digits/dxmi_digits_s$s/pretrain --out $root/pg/pg_classifier_digits_s$s"
done | run_all
