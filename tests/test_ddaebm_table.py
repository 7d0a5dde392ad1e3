"""scripts/ddaebm_table.py's --over-seeds summary: mean ± std over the seeds of each run name, from run folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddaebm_table.py"


def fake_run(folder: Path, evals: list[tuple[int, dict]], final: dict) -> None:
    """A run folder as the trainer leaves it: periodic evaluations in metrics.jsonl, the final one in eval.json."""
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": step, "time_s": 10.0 * step, "eval": metrics}) for step, metrics in evals]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "eval.json").write_text(json.dumps({"step": 100, "metrics": final,
                                                  "initial_metrics": {"frechet_distance": 50.0}}))


def sw(value: float, auc: float, coverage: float) -> dict:
    return {"sliced_wasserstein": value, "sliced_wasserstein_std": 0.001, "energy_auc": auc, "mode_coverage": coverage}


def test_over_seeds_groups_by_name_and_gives_mean_and_sample_std(tmp_path: Path):
    # two seeds of one 2D run: finals SW 0.06 / 0.08, AUC 0.90 / 0.88; spread over steps >= 60: |0.07-0.06|, |0.09-0.08|
    fake_run(tmp_path / "roll_s0", [(50, sw(0.2, 0.5, 0.0)), (60, sw(0.07, 0.8, 1.0))], sw(0.06, 0.90, 1.0))
    fake_run(tmp_path / "roll_s1", [(50, sw(0.2, 0.5, 0.0)), (80, sw(0.09, 0.8, 1.0))], sw(0.08, 0.88, 0.5))
    fake_run(tmp_path / "digits_s2", [(50, {"frechet_distance": 20.0})], {"frechet_distance": 12.0})
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--over-seeds"], capture_output=True, text=True,
                         check=True).stdout
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines()[2:]}
    assert set(rows) == {"roll", "digits"}
    roll = [cell.strip() for cell in rows["roll"].strip("|").split("|")]
    # SW: mean 0.07, sample std 0.01414; AUC: 0.89 ± 0.01414; coverage 0.75 ± 0.354; spread 0.01 ± 0
    assert roll[1:6] == ["0, 1", "0.070 ± 0.014", "0.890 ± 0.014", "0.750 ± 0.354", "0.010 ± 0.000"]
    digits = [cell.strip() for cell in rows["digits"].strip("|").split("|")]
    assert digits[1] == "2" and digits[-1] == "12.000 ± -" and digits[2] == ""
