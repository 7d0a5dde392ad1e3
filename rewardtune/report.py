"""Summaries of a folder of runs: markdown tables (per run and per recipe over seeds) and metric-vs-time curves.

A run is a sub-folder with an eval.json; runs named `<group>_s<seed>` are grouped. Wall times are read from an
optional `wall_times.txt` ("<run name> <seconds>" per line) in the folder.

Conditional runs report flat per-condition keys "<metric>/<condition>" (e.g. "class_accuracy/class 3") and, for
held-out conditions, "held_out/<metric>" (pooled) and "held_out/<metric>/<condition>". The run and recipe tables
then hold the pooled metrics, and per-condition tables (mean ± std over seeds, per recipe and condition) follow.
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


HELD_OUT_PREFIX = "held_out/"  # the prefix of the metrics of a run's held-out conditions


def split_metric_key(key: str) -> tuple[bool, str, str | None]:
    """(held out, metric, condition or None for a pooled metric) of an eval metric's key:
    "class_accuracy/class 3" -> (False, "class_accuracy", "class 3"), "held_out/reward_mean" -> (True,
    "reward_mean", None). A condition may itself hold "/" (a prompt); metric names hold none."""
    held_out = key.startswith(HELD_OUT_PREFIX)
    metric, slash, condition = key[len(HELD_OUT_PREFIX) :].partition("/") if held_out else key.partition("/")
    return held_out, metric, condition if slash else None


def pooled_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics that are not per condition (held-out pooled ones included), in their order."""
    return {k: v for k, v in metrics.items() if split_metric_key(k)[2] is None}


def condition_rows(metrics: dict[str, float], *, held_out: bool) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The per-condition metrics of the training (or the held-out) conditions: (metric names, sorted; {condition:
    {metric: value}} in the order the conditions first appear). Empty for an unconditional run."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        split, metric, condition = split_metric_key(key)
        if condition is not None and split == held_out:
            rows.setdefault(condition, {})[metric] = value
    return sorted({m for values in rows.values() for m in values}), rows


def markdown_tables(runs: list[dict]) -> str:
    """One row per run (final and starting value of each metric) and one per group (mean ± std over seeds); for
    conditional runs, these tables hold the pooled metrics, and per-condition tables follow."""
    text = pooled_tables(runs)
    for held_out, title in ((False, "Per condition"), (True, "Held-out conditions")):
        table = condition_tables(runs, held_out=held_out)
        if table:
            text += f"\n\n{title} (mean ± std over seeds):\n\n{table}"
    return text


def condition_tables(runs: list[dict], *, held_out: bool) -> str:
    """One row per group and condition: each per-condition metric's mean ± std over the group's seeds ("" when no
    run has per-condition metrics)."""
    groups: dict[str, dict[str, dict[str, list[float]]]] = {}  # group -> condition -> metric -> values over seeds
    seeds: dict[tuple[str, str], int] = {}
    for r in runs:
        _, rows = condition_rows(r["metrics"], held_out=held_out)
        for condition, values in rows.items():
            seeds[r["group"], condition] = seeds.get((r["group"], condition), 0) + 1
            for metric, value in values.items():
                groups.setdefault(r["group"], {}).setdefault(condition, {}).setdefault(metric, []).append(value)
    names = sorted({m for conditions in groups.values() for c in conditions.values() for m in c if not m.endswith("_std")})
    if not names:
        return ""
    lines = ["| recipe | condition | seeds | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
    for group, conditions in groups.items():
        for condition, values in conditions.items():
            cells = [mean_std(values[m]) if m in values else "-" for m in names]
            name = condition.replace("|", "\\|")  # a prompt may hold the table's separator
            lines.append(f"| {group} | {name} | {seeds[group, condition]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_std(values: list[float]) -> str:
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {sd:.2g}"


def pooled_tables(runs: list[dict]) -> str:
    """The run table and the recipe table of the pooled metrics (every metric of an unconditional run)."""
    keys = sorted({k for r in runs for k in pooled_metrics(r["metrics"]) if not k.endswith("_std")})
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
            cells.append(mean_std(values) if values else "-")
        lines.append(f"| {group} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[dict], path: Path, references: dict[str, list[tuple[float, str]]] | None = None) -> bool:
    """Each pooled metric (one panel; per-condition metrics are left to the tables) against training time, from the
    eval records of every run's metrics.jsonl. Returns whether there was anything to plot (nothing is written
    otherwise)."""
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
    keys = sorted({k for _, pts in series for _, m in pts for k in pooled_metrics(m) if not k.endswith("_std")})
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
