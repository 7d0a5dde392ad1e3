#!/usr/bin/env bash
# Reproduce the 8-Gaussians table (DxMI Table 1) into runs/table1/: every command as a user would type it, timed.
# Usage: scripts/table1.sh [SEEDS...]   (default seeds: 0 1 2). Afterwards: rewardtune report runs/table1 --curves docs/img/table1_curves.png
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("${@:-0 1 2}")
out=runs/table1
mkdir -p "$out"
timed() {  # timed NAME COMMAND...: run it, record the wall time
  local name=$1; shift
  local start=$(date +%s.%N)
  "$@" > "$out/$name.log" 2>&1
  echo "$name $(echo "$(date +%s.%N) - $start" | bc)" >> "$out/wall_times.txt"
}
for seed in ${seeds[@]}; do
  timed "dxmi_s$seed" rewardtune run recipes/dxmi_8gaussians.toml --seed "$seed" --out "$out/dxmi_s$seed"
done
for T in 5 10 100 1000; do
  timed "ddpm_t${T}_s0" rewardtune run "recipes/ddpm_8gaussians_t$T.toml" --seed 0 --out "$out/ddpm_t${T}_s0"
done
for variant in tau0 tau1 scratch; do
  timed "${variant}_s0" rewardtune run "recipes/dxmi_8gaussians_$variant.toml" --seed 0 --out "$out/${variant}_s0"
done
