#!/usr/bin/env bash
# The DDAEBM measurements of docs/results.md (issue W2 5/8), JOBS at a time (one thread each):
#   8 Gaussians at T = 4 on seeds 0-2; Jeffrey vs KL only on Swiss roll and 25 Gaussians; T = 1 and 2 on 8 Gaussians;
#   the z = 0 ablation; pinwheel; digits at T = 4 (and DxMI's digits row on the same training split) and the OOD table.
# Usage: JOBS=2 [ABLATION_SEEDS="0 1 2"] [DIGITS_SEEDS="0 1 2"] bash scripts/ddaebm_runs.sh [OUT]   (OUT defaults to runs/ddaebm)
set -euo pipefail
OUT=${1:-runs/ddaebm}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"

run() {  # run NAME RECIPE [--set ...]: skipped when the run finished before (eval.json), resumed when it started
  local name=$1 recipe=$2
  shift 2
  if [ -f "$OUT/$name/eval.json" ]; then return; fi
  local resume=()
  if [ -d "$OUT/$name/checkpoints" ]; then resume=(--resume); fi
  rewardtune run "recipes/$recipe" --out "$OUT/$name" "${resume[@]}" "$@" > "$OUT/$name.log" 2>&1
}
export -f run
export OUT
HALF="--set train.steps=15000 --set train.eval_every=2500"

{
  echo "run 8g_s0 ddaebm_8gaussians.toml --seed 0"
  echo "run 8g_s1 ddaebm_8gaussians.toml --seed 1"
  for s in ${DIGITS_SEEDS-0 1 2}; do echo "run digits_s$s ddaebm_digits.toml --seed $s"; done
  echo "run 8g_s2 ddaebm_8gaussians.toml --seed 2"
  # the ablations at half the iterations (15,000), beside T = 4 with the Jeffrey divergence at the same budget,
  # on ABLATION_SEEDS (default 0 1 2)
  for s in ${ABLATION_SEEDS-0 1 2}; do
    for d in swissroll 25gaussians; do
      echo "run ${d}_jeffrey_15k_s$s ddaebm_$d.toml $HALF --seed $s"
      echo "run ${d}_kl_15k_s$s ddaebm_$d.toml $HALF --seed $s --set algorithm.divergence=kl"
    done
    echo "run 8g_T4_15k_s$s ddaebm_8gaussians.toml $HALF --seed $s"
    for t in 1 2; do echo "run 8g_T${t}_15k_s$s ddaebm_8gaussians.toml $HALF --seed $s --set backbone.num_steps=$t"; done
    echo "run 8g_z0_15k_s$s ddaebm_8gaussians.toml $HALF --seed $s --set backbone.latent_dim=0"
  done
  for s in ${DIGITS_SEEDS-0 1 2}; do
    echo "run ddpm_digits_train_s$s ddpm_digits.toml --seed $s --set data.split=train && run dxmi_digits_train_s$s dxmi_digits.toml --seed $s --set data.split=train --set backbone.init_from=$OUT/ddpm_digits_train_s$s"
  done
  echo "run pinwheel_s0 ddaebm_pinwheel.toml"
} | xargs -P "$JOBS" -I{} bash -c "{}"

for s in ${DIGITS_SEEDS-0 1 2}; do  # the OOD table of each seed
  python scripts/ood_digits.py "$OUT/digits_s$s" "$OUT/dxmi_digits_train_s$s" > "$OUT/ood_s$s.txt"
done
