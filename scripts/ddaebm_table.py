"""The DDAEBM tables of docs/results.md from the runs of scripts/ddaebm_runs.sh.

    python scripts/ddaebm_table.py [OUT] [--over-seeds]     (OUT defaults to runs/ddaebm)

For each finished 2D run (eval.json): final sliced Wasserstein (mean ± std over the evaluation's 5 samplings), energy
AUC, mode coverage, the spread of SW over the evaluations of the last 40% of training (max - min: the stability the
T ablation is about), training time and iterations per second; for the digits runs, the Fréchet distance.
With --over-seeds, one row per run name less its `_sN` seed suffix: mean ± std over the seeds found (std with
n - 1; "-" for a single seed) of the final SW, AUC, mode coverage, SW spread and Fréchet distance.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path


def evaluations(run: Path) -> list[tuple[int, dict]]:
    """(step, metrics) of every periodic evaluation in metrics.jsonl, then the final one."""
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval" in record:
            rows.append((record["step"], record["eval"]))
    final = json.loads((run / "eval.json").read_text())
    rows.append((final["step"], final["metrics"]))
    return rows


def training_time(run: Path) -> tuple[float, int]:
    """(seconds, iterations) of the last metrics.jsonl record."""
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return float(last["time_s"]), int(last["step"])


def final_figures(run: Path) -> dict[str, float]:
    """The figures --over-seeds averages: final SW, AUC, coverage and SW spread (2D), or the Fréchet distance."""
    rows = evaluations(run)
    step, final = rows[-1]
    if "sliced_wasserstein" in final:
        late = [m["sliced_wasserstein"] for s, m in rows if s >= 0.6 * step]
        figures = {"SW final": final["sliced_wasserstein"], "SW spread, last 40%": max(late) - min(late)}
        for key, name in (("energy_auc", "energy AUC"), ("mode_coverage", "mode coverage")):
            if key in final:
                figures[name] = final[key]
        return figures
    return {"FD final": final["frechet_distance"]} if "frechet_distance" in final else {}


def mean_std(values: list[float]) -> str:
    """'mean ± std' (sample std), or the value and '-' for one seed."""
    if len(values) == 1:
        return f"{values[0]:.3f} ± -"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_over_seeds(runs: list[Path]) -> None:
    """One markdown row per run name less its seed suffix: mean ± std of each figure over the seeds."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for run in runs:
        groups[re.sub(r"_s\d+$", "", run.name)].append(run)
    names = ["SW final", "energy AUC", "mode coverage", "SW spread, last 40%", "FD final"]
    print("| runs | seeds | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for group, members in sorted(groups.items()):
        figures = [final_figures(run) for run in members]
        cells = [mean_std([f[n] for f in figures]) if all(n in f for f in figures) else "" for n in names]
        seeds = ", ".join(sorted(run.name.rsplit("_s", 1)[-1] for run in members))
        print(f"| {group} | {seeds} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("runs/ddaebm"), help="the runs' folder")
    parser.add_argument("--over-seeds", action="store_true", help="mean ± std over the seeds of each run name")
    args = parser.parse_args()
    out = args.out
    if not out.is_dir():
        raise SystemExit(f"error: {out} is not a folder of runs")
    if args.over_seeds:
        print_over_seeds(sorted(p for p in out.iterdir() if (p / "eval.json").is_file()))
        return
    print("| run | iterations | SW final | energy AUC | mode coverage | SW spread, last 40% | time (it/s) |")
    print("|---|---|---|---|---|---|---|")
    for run in sorted(p for p in out.iterdir() if (p / "eval.json").is_file()):
        rows = evaluations(run)
        step, final = rows[-1]
        seconds, iterations = training_time(run)
        if "sliced_wasserstein" in final:
            late = [m["sliced_wasserstein"] for s, m in rows if s >= 0.6 * step]
            print(f"| {run.name} | {step:,} | {final['sliced_wasserstein']:.3f} ± {final['sliced_wasserstein_std']:.3f} | "
                  f"{final.get('energy_auc', float('nan')):.3f} | {final.get('mode_coverage', float('nan')):.2f} | "
                  f"{max(late) - min(late):.3f} | {seconds:,.0f} s ({iterations / seconds:.1f}) |")
        elif "frechet_distance" in final:
            start = json.loads((run / "eval.json").read_text())["initial_metrics"]["frechet_distance"]
            print(f"| {run.name} | {step:,} | FD {final['frechet_distance']:.2f} (start {start:.2f}) | | | | "
                  f"{seconds:,.0f} s ({iterations / seconds:.1f}) |")


if __name__ == "__main__":
    main()
