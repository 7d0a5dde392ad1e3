"""Summarise runs/table1 (from scripts/table1.sh): a markdown table on stdout and docs/img/table1_curves.png.

Usage: python scripts/table1_report.py runs/table1 [docs/img/table1_curves.png]
"""

import json
import statistics
import sys
from pathlib import Path

root = Path(sys.argv[1])
png = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("docs/img/table1_curves.png")
walls = {}
if (root / "wall_times.txt").exists():
    for line in (root / "wall_times.txt").read_text().splitlines():
        name, seconds = line.split()
        walls[name] = float(seconds)


def row(name: str) -> dict | None:
    path = root / name / "eval.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return {"name": name, "wall": walls.get(name), **result}


print("| run | SW (final, 5 samplings) | AUC | SW at start | wall time (s) |")
print("|---|---|---|---|---|")
groups: dict[str, list[dict]] = {}
for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    r = row(run_dir.name)
    if r is None:
        continue
    m, i = r["metrics"], r["initial_metrics"]
    auc = f"{m['energy_auc']:.3f}" if "energy_auc" in m else "-"
    wall = f"{r['wall']:.0f}" if r["wall"] else "-"
    print(f"| {r['name']} | {m['sliced_wasserstein']:.3f} ± {m['sliced_wasserstein_std']:.3f} | {auc} | "
          f"{i['sliced_wasserstein']:.3f} | {wall} |")
    groups.setdefault(r["name"].rsplit("_s", 1)[0], []).append(r)
print()
print("| recipe | seeds | SW mean over seeds | AUC mean over seeds |")
print("|---|---|---|---|")
for group, rows in groups.items():
    sws = [r["metrics"]["sliced_wasserstein"] for r in rows]
    aucs = [r["metrics"]["energy_auc"] for r in rows if "energy_auc" in r["metrics"]]
    sd = statistics.pstdev(sws) if len(sws) > 1 else 0.0
    auc = f"{statistics.mean(aucs):.3f}" if aucs else "-"
    print(f"| {group} | {len(rows)} | {statistics.mean(sws):.3f} ± {sd:.3f} | {auc} |")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, (ax_sw, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
for group, rows in groups.items():
    if not group.startswith(("dxmi", "tau", "scratch")):
        continue
    for r in rows:
        lines = [json.loads(x) for x in (root / r["name"] / "metrics.jsonl").read_text().splitlines()]
        evals = [(x["time_s"], x["eval"]) for x in lines if "eval" in x]
        start = (0.0, r["initial_metrics"])
        end = (lines[-1]["time_s"], r["metrics"])
        points = [start, *evals, end]
        ax_sw.plot([t for t, _ in points], [e["sliced_wasserstein"] for _, e in points], marker="o", label=r["name"])
        if "energy_auc" in r["metrics"]:
            ax_auc.plot([t for t, _ in points], [e["energy_auc"] for _, e in points], marker="o", label=r["name"])
ax_sw.axhline(0.068, color="k", ls="--", lw=0.8, label="paper DxMI 0.068")
ax_sw.axhline(0.046, color="gray", ls=":", lw=0.8, label="data-vs-data floor 0.046")
ax_sw.set(xlabel="training time (s, after pretraining)", ylabel="sliced Wasserstein-2", yscale="log")
ax_auc.axhline(0.906, color="gray", ls=":", lw=0.8, label="true density 0.906")
ax_auc.set(xlabel="training time (s, after pretraining)", ylabel="energy AUC (data vs uniform)")
ax_sw.legend(fontsize=7)
ax_auc.legend(fontsize=7)
fig.tight_layout()
png.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(png, dpi=100)
print(f"\ncurves: {png}")
