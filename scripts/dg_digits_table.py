"""The digits discriminator-guidance table from finished runs of scripts/dg_digits_runs.sh.

    python scripts/dg_digits_table.py [--runs runs/dg] [--seeds 0 1 2]

Reads each run's eval.json: `ddpm_digits_sS` (the frozen T = 4 sampler, unguided), `dg_hybrid_sS` and `dg_bce_sS`
(the same sampler guided at scale 1 by the discriminator trained with that loss). Prints one row per seed (Fréchet
distance, × the seed's unguided sampler, precision / recall) and the mean ± sample standard deviation over the seeds
that have all three runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SAMPLERS = (("frozen DDPM, T = 4", "ddpm_digits"), ("+ DG, hybrid loss", "dg_hybrid"), ("+ DG, BCE", "dg_bce"))


def read_metrics(runs: Path, name: str, seed: int) -> dict[str, float] | None:
    path = runs / f"{name}_s{seed}" / "eval.json"
    return json.loads(path.read_text())["metrics"] if path.is_file() else None


def mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/dg"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    table = {seed: [read_metrics(args.runs, name, seed) for _, name in SAMPLERS] for seed in args.seeds}
    complete = [seed for seed, row in table.items() if all(m is not None for m in row)]
    print("| seed | " + " | ".join(label for label, _ in SAMPLERS) + " |")
    print("|---|" + "---|" * len(SAMPLERS))
    for seed in complete:
        base = table[seed][0]["frechet_distance"]
        cells = [f"{m['frechet_distance']:.2f} (× {m['frechet_distance'] / base:.2f}; {m['precision']:.3f} / "
                 f"{m['recall']:.3f})" for m in table[seed]]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    cells = []
    for i in range(len(SAMPLERS)):
        fd = [table[s][i]["frechet_distance"] for s in complete]
        ratio = [table[s][i]["frechet_distance"] / table[s][0]["frechet_distance"] for s in complete]
        cells.append(f"**{mean_std(fd)}** (× {mean_std(ratio)})")
    print(f"| mean ± std ({len(complete)} seeds) | " + " | ".join(cells) + " |")
    missing = [seed for seed in args.seeds if seed not in complete]
    if missing:
        print(f"\nseeds without all three runs: {missing}")


if __name__ == "__main__":
    main()
