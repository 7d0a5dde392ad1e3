#!/usr/bin/env bash
# recipes/dg_gmm.toml on seeds 0-2 (issue W2 6/8): the unguided chain (guidance 0), then the hybrid and the BCE
# discriminators, each evaluated guided at scale 1. Usage: bash scripts/dg_gmm_runs.sh [OUT]   (default runs/dg_gmm)
set -euo pipefail
OUT=${1:-runs/dg_gmm}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
for seed in 0 1 2; do
  [ -f "$OUT/unguided_s$seed/eval.json" ] || rewardtune run recipes/dg_gmm.toml --seed $seed --out "$OUT/unguided_s$seed" \
    --steps 1 --set eval.guidance_scale=0 --set train.eval_every=1 > "$OUT/unguided_s$seed.log" 2>&1
  for loss in hybrid bce; do
    [ -f "$OUT/${loss}_s$seed/eval.json" ] || rewardtune run recipes/dg_gmm.toml --seed $seed --out "$OUT/${loss}_s$seed" \
      --set algorithm.loss=$loss > "$OUT/${loss}_s$seed.log" 2>&1
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| sampler | SW to P (mean over seeds) | per seed | missing mode's mass (min_mode_mass) | per seed |")
print("|---|---|---|---|---|")
for name in ("unguided", "bce", "hybrid"):
    m = [json.loads((out / f"{name}_s{s}" / "eval.json").read_text())["metrics"] for s in (0, 1, 2)]
    sw, mass = [x["sliced_wasserstein"] for x in m], [x["min_mode_mass"] for x in m]
    print(f"| {name} | {statistics.mean(sw):.3f} ± {statistics.stdev(sw):.3f} | {' / '.join(f'{v:.3f}' for v in sw)} "
          f"| {statistics.mean(mass):.3f} ± {statistics.stdev(mass):.3f} | {' / '.join(f'{v:.3f}' for v in mass)} |")
PY
