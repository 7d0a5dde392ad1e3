#!/usr/bin/env bash
# Discriminator guidance on the frozen digits DDPM (issue W2 6/8): the pretrained sampler (all digits, the one
# dxmi_digits starts from; its own eval.json is the unguided T = 4 sampler's FD, same samples and evaluation seed),
# then the hybrid and the BCE discriminators (each run's eval.json: the sampler guided at scale 1).
# Usage: bash scripts/dg_digits_runs.sh [OUT] [SEED]   (OUT defaults to runs/dg)
set -euo pipefail
OUT=${1:-runs/dg}
SEED=${2:-0}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
[ -f "$OUT/ddpm_digits_s$SEED/eval.json" ] || rewardtune run recipes/ddpm_digits.toml --seed "$SEED" --out "$OUT/ddpm_digits_s$SEED" > "$OUT/ddpm_digits_s$SEED.log" 2>&1
for loss in hybrid bce; do
  [ -f "$OUT/dg_${loss}_s$SEED/eval.json" ] || rewardtune run recipes/dg_digits.toml --seed "$SEED" --out "$OUT/dg_${loss}_s$SEED" \
    --set backbone.init_from="$OUT/ddpm_digits_s$SEED" --set algorithm.loss=$loss > "$OUT/dg_${loss}_s$SEED.log" 2>&1
done
