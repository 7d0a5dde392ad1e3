"""The offline anomaly-detection benchmark of docs/results.md (issue W2 7/8): DxMI (tau = 0.1) against its own
pretrained autoencoder, DxMI at tau = 0, and standard detectors on exactly the same features.

Sets (anomaly/sets.py): "defects", sklearn digits at 32 x 32 with synthetic defects and exact masks (detection and
localisation AUROC); "novelty", one digit class left out of training (detection AUROC per held-out class).
Features: the digits classifier's conv layers at 8 x 8 (96 channels, on the unit sphere; anomaly/features.py).

    python scripts/anomaly_benchmark.py [--out runs/anomaly] [--seeds 0 1 2] [--classes 0 1 ... 9]
        [--novelty-steps 1000] [--novelty-seeds 0 1 2] [--jobs 2]

DxMI runs go through `rewardtune run recipes/anomaly_digits_defects.toml` (finished runs are skipped, started ones
resumed); "autoencoder" is the same run's step-0 evaluation (the pretrained energy before any DxMI step). Writes
<out>/table.md and <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RECIPE = "recipes/anomaly_digits_defects.toml"
TAU0 = ["--set", "algorithm.tau_entropy=0", "--set", "algorithm.tau_velocity=0"]
BASELINE_NAMES = ("knn", "gaussian", "isolation_forest")


def finished(out: Path, name: str) -> dict | None:
    """A finished run's eval.json (None when it has not finished)."""
    path = out / name / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_dxmi(out: Path, name: str, args: list[str]) -> dict:
    """`rewardtune run` into out/name (skipped when finished, resumed when started); its eval.json."""
    run_dir = out / name
    if not (run_dir / "eval.json").exists():
        resume = ["--resume"] if (run_dir / "checkpoints").is_dir() else []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        with open(out / f"{name}.log", "a") as log:
            subprocess.run(["rewardtune", "run", RECIPE, "--out", str(run_dir), *resume, *args], check=True, env=env,
                           stdout=log, stderr=subprocess.STDOUT)
    return json.loads((run_dir / "eval.json").read_text())


def baselines(source: str, held_out: int, seed: int) -> dict[str, dict[str, float]]:
    """kNN, per-location Gaussian and Isolation Forest on the recipe's features: {name: metrics}."""
    from rewardtune.anomaly.baselines import BASELINES
    from rewardtune.anomaly.evaluation import detection_metrics
    from rewardtune.data.anomaly import build_anomaly_features

    data = build_anomaly_features(source=source, held_out=held_out, extractor="digits_cnn")
    options = {"knn": {"max_train": 20000, "seed": seed}, "gaussian": {}, "isolation_forest": {"seed": seed}}
    results = {}
    for name in BASELINE_NAMES:
        detector = BASELINES[name](**options[name]).fit(data.train_maps)
        results[name] = detection_metrics(detector.energy_map(data.test_maps), data.anomaly_set)
    return results


def jobs_for(seeds: list[int], classes: list[int], novelty_steps: int,
             novelty_seeds: list[int]) -> list[tuple[str, list[str]]]:
    """(run name, rewardtune run arguments) of every DxMI run: the defects set at the recipe's length on every seed,
    with tau = 0.1 and tau = 0; each held-out class of the novelty set at `novelty_steps` on each novelty seed (the
    seed-0 runs of every class first)."""
    jobs = []
    for seed in seeds:
        jobs.append((f"defects_tau0.1_s{seed}", ["--seed", str(seed)]))
        jobs.append((f"defects_tau0_s{seed}", ["--seed", str(seed), *TAU0]))
    for seed in novelty_seeds:
        for k in classes:
            jobs.append((f"novelty_{k}_tau0.1_s{seed}", ["--seed", str(seed), "--set", "data.source=digits_novelty",
                                                          "--set", f"data.held_out={k}", "--steps", str(novelty_steps)]))
    return jobs


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def defects_table(results: dict, seeds: list[int]) -> list[str]:
    rows = ["| method | image AUROC | pixel AUROC |", "|---|---|---|"]

    def row(name: str, metrics: list[dict]) -> str:
        if not metrics:
            return f"| {name} | not run | not run |"
        image = mean_std([m["image_auroc"] for m in metrics])
        pixel = mean_std([m["pixel_auroc"] for m in metrics])
        return f"| {name} | {image} | {pixel} ({len(metrics)} seed{'s' if len(metrics) > 1 else ''}) |"

    def runs(prefix: str, key: str = "metrics") -> list[dict]:
        return [results[f"{prefix}_s{s}"][key] for s in seeds if results.get(f"{prefix}_s{s}")]

    rows.append(row("DxMI, tau = 0.1", runs("defects_tau0.1")))
    rows.append(row("DxMI, tau = 0", runs("defects_tau0")))
    rows.append(row("autoencoder alone (DxMI's start)", runs("defects_tau0.1", "initial_metrics")))
    for name in BASELINE_NAMES:
        rows.append(row(name, [results[f"baselines_defects_s{s}"][name] for s in seeds]))
    return rows


def novelty_table(results: dict, classes: list[int], seeds: list[int]) -> list[str]:
    """Detection AUROC per held-out class: each cell the mean ± std over the seeds that finished (the count in
    brackets when fewer than `seeds`), the last column the mean ± std over classes of the per-class means."""
    header = "| method | " + " | ".join(str(k) for k in classes) + " | mean ± std over classes |"
    rows = [header, "|---|" + "---|" * (len(classes) + 1)]

    def cell(values: list[float]) -> str:
        if not values:
            return "not run"
        return mean_std(values) + (f" ({len(values)})" if len(values) < len(seeds) else "")

    def row(name: str, per_class: list[list[float]]) -> str:
        means = [statistics.mean(v) for v in per_class if v]
        return f"| {name} | {' | '.join(cell(v) for v in per_class)} | {mean_std(means) if means else 'not run'} |"

    def dxmi(k: int, key: str) -> list[float]:
        runs = [results.get(f"novelty_{k}_tau0.1_s{s}") for s in seeds]
        return [run[key]["image_auroc"] for run in runs if run is not None]

    rows.append(row("DxMI, tau = 0.1", [dxmi(k, "metrics") for k in classes]))
    rows.append(row("autoencoder alone", [dxmi(k, "initial_metrics") for k in classes]))
    for name in BASELINE_NAMES:
        rows.append(row(name, [[results[f"baselines_novelty_{k}_s{s}"][name]["image_auroc"] for s in seeds]
                               for k in classes]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/anomaly"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--classes", type=int, nargs="*", default=list(range(10)))
    parser.add_argument("--novelty-steps", type=int, default=1000)
    parser.add_argument("--novelty-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--table-only", action="store_true", help="tables from the runs that finished; run nothing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    jobs = jobs_for(args.seeds, args.classes, args.novelty_steps, args.novelty_seeds)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {} if args.table_only else {name: pool.submit(run_dxmi, args.out, name, run_args)
                                              for name, run_args in jobs}
        for seed in args.seeds:
            results[f"baselines_defects_s{seed}"] = baselines("digits_defects", 0, seed)
        for k in args.classes:
            for seed in args.novelty_seeds:
                results[f"baselines_novelty_{k}_s{seed}"] = baselines("digits_novelty", k, seed)
        results.update({name: future.result() for name, future in futures.items()})
    results.update({name: finished(args.out, name) for name, _ in jobs if name not in results})
    lines = ["### Defects (digits 32 x 32, synthetic defects)", "", *defects_table(results, args.seeds)]
    if args.classes:
        lines += ["", "### Semantic novelty (one digit class held out; detection AUROC)", "",
                  *novelty_table(results, args.classes, args.novelty_seeds)]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
