"""Summaries of a folder of runs: markdown tables (per run and per recipe over seeds) and metric-vs-time curves.

A run is a sub-folder with an eval.json; runs named `<group>_s<seed>` are grouped. Wall times are read from an
optional `wall_times.txt` ("<run name> <seconds>" per line) in the folder.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from rewardtune.errors import RewardtuneError


def read_wall_times(path: Path) -> dict[str, float]:
    """{run name: seconds} from `wall_times.txt` lines "<run name> <seconds>"."""
    walls = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if len(parts) == 2:
            try:
                walls[parts[0]] = float(parts[1])
            except ValueError:
                raise RewardtuneError(f"{path}:{number}: {parts[1]!r} is not a number of seconds") from None
    return walls


def read_eval(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RewardtuneError(f"{path}: not valid JSON ({err}); re-run `rewardtune eval` on its run") from None
    if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict) or "step" not in result:
        raise RewardtuneError(f"{path}: not an eval.json (needs 'step' and 'metrics')")
    return result


def read_log(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line being written (a run still going) is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def load_runs(root: Path) -> list[dict]:
    walls = read_wall_times(root / "wall_times.txt") if (root / "wall_times.txt").exists() else {}
    runs = []
    for path in sorted(p for p in root.iterdir() if (p / "eval.json").is_file()):
        result = read_eval(path / "eval.json")
        group = re.sub(r"_s\d+$", "", path.name)
        runs.append({"name": path.name, "group": group, "path": path, "wall": walls.get(path.name), **result})
    return runs


def markdown_tables(runs: list[dict]) -> str:
    """One row per run (final and starting value of each metric) and one per group (mean ± std over seeds)."""
    keys = sorted({k for r in runs for k in r["metrics"] if not k.endswith("_std")})
    lines = ["| run | step | " + " | ".join(f"{k} (start)" for k in keys) + " | wall time (s) |"]
    lines.append("|---" * (len(keys) + 3) + "|")
    for r in runs:
        cells = []
        for k in keys:
            if k not in r["metrics"]:
                cells.append("-")
                continue
            std = r["metrics"].get(f"{k}_std")
            value = f"{r['metrics'][k]:.4g}" + (f" ± {std:.2g}" if std else "")
            start = (r.get("initial_metrics") or {}).get(k)
            cells.append(value + (f" ({start:.4g})" if start is not None else ""))
        wall = f"{r['wall']:.0f}" if r["wall"] else "-"
        lines.append(f"| {r['name']} | {r['step']} | " + " | ".join(cells) + f" | {wall} |")
    lines += ["", "| recipe | seeds | " + " | ".join(f"{k} mean ± std over seeds" for k in keys) + " |"]
    lines.append("|---" * (len(keys) + 2) + "|")
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["group"], []).append(r)
    for group, members in groups.items():
        cells = []
        for k in keys:
            values = [m["metrics"][k] for m in members if k in m["metrics"]]
            sd = statistics.pstdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4g} ± {sd:.2g}" if values else "-")
        lines.append(f"| {group} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[dict], path: Path, references: dict[str, list[tuple[float, str]]] | None = None) -> bool:
    """Each metric (one panel) against training time, from the eval records of every run's metrics.jsonl. Returns
    whether there was anything to plot (nothing is written otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for r in runs:
        log = r["path"] / "metrics.jsonl"
        if not log.exists():
            continue
        records = read_log(log)
        timed = [x for x in records if isinstance(x, dict) and "time_s" in x]
        evals = [(x["time_s"], x["eval"]) for x in timed if "eval" in x]
        if timed and r["step"] > 0:
            start = (0.0, r.get("initial_metrics") or {})
            series.append((r["name"], [start, *evals, (timed[-1]["time_s"], r["metrics"])]))
    keys = sorted({k for _, pts in series for _, m in pts for k in m if not k.endswith("_std")})
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, points in series:
            pts = [(t, m[key]) for t, m in points if key in m]
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", ms=3, label=name)
        for value, label in (references or {}).get(key, []):
            ax.axhline(value, color="k", ls=":", lw=0.8, label=label)
        ax.set(xlabel="training time (s, after pretraining)", ylabel=key)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
