#!/bin/bash
# The shapes benchmark (docs/results.md, issue W2 3/8): the text-conditional DDPM (ddpm_shapes.toml, seed 0), then
# from it DxDP with the verifier and a learned energy (shapes_dxdp_ebm.toml), DxDP with the verifier only, PPO with
# per-prompt normalisation and PPO with group advantages (GRPO) at T = 4 for each fine-tuning seed, all from the same
# pretrained sampler. Runs go JOBS at a time (default 2; one thread each); finished runs are skipped and stopped ones
# resumed (run_all.sh). `python scripts/bench_dxdp_vs_pg.py --tasks shapes --plot docs/img/shapes_methods.png`
# tabulates and plots them.
#   JOBS=2 bash scripts/shapes_runs.sh [RUNS_ROOT] [SEEDS...]      # defaults: runs, seeds 0 1 2
set -uo pipefail
root=${1:-runs}; shift || true
seeds=${*:-0 1 2}
source "$(dirname "$0")/run_all.sh"
echo "recipes/ddpm_shapes.toml --seed 0 --out $root/shapes/pretrain_s0" | run_all
for s in $seeds; do
  echo "recipes/shapes_dxdp_ebm.toml --seed $s --set backbone.init_from=$root/shapes/pretrain_s0 --out $root/shapes/ebm_bf16_s$s"
  for method in dxdp ppo grpo; do
    echo "recipes/shapes_$method.toml --seed $s --set backbone.init_from=$root/shapes/pretrain_s0 --out $root/shapes/${method}_s$s"
  done
done | run_all
