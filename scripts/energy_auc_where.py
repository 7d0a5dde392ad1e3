"""Where a 2D energy's AUC is lost: the uniform points that score like data, and how far they lie from the modes.

    python scripts/energy_auc_where.py RUN [RUN ...] [--n 10000] [--box 4.1] [--seed 0]

Each RUN is a finished run on a mixture data set that knows its modes (`8gaussians`, `25gaussians`, `gmm`) whose
reward learns an energy (DxMI's `energy`, DDAEBM's `time_energy`). The reward r(x) (higher: more data-like) is
scored on n data points and on n uniform points in [-box, box]^2, the energy-AUC protocol. Printed per run: how many
uniform points score above the data's median (those are what lowers the AUC), their distance to the nearest mode
(median and 90th percentile) against the data's own, and their median radius against the modes'.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from rewardtune.api import load_run


@torch.no_grad()
def where(run: str, n: int, box: float, seed: int) -> str:
    trainer = load_run(run)
    centers = getattr(trainer.data, "centers", None)
    if centers is None or trainer.reward is None:
        raise SystemExit(f"error: {run} has no mixture data with known modes, or no learned reward")
    centers = centers.float()
    generator = torch.Generator().manual_seed(seed)
    data = trainer.data.sample(n, generator).float()
    uniform = (torch.rand(n, 2, generator=generator) * 2 - 1) * box
    score_data, score_uniform = trainer.reward(data).float(), trainer.reward(uniform).float()
    high = uniform[score_uniform > score_data.median()]
    to_mode = torch.cdist(high, centers).min(1).values
    data_to_mode = torch.cdist(data, centers).min(1).values
    return (f"| {run} | {len(high)} | {to_mode.median():.2f} / {to_mode.quantile(0.9):.2f} | "
            f"{data_to_mode.median():.2f} / {data_to_mode.quantile(0.9):.2f} | {high.norm(dim=1).median():.2f} | "
            f"{centers.norm(dim=1).median():.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--box", type=float, default=4.1, help="half-width of the uniform box (the evaluator's: 4.1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| run | uniform points above the data's median score | their distance to the nearest mode, median / 90% "
          "| the data's, median / 90% | their median radius | the modes' radius |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        print(where(run, args.n, args.box, args.seed), flush=True)


if __name__ == "__main__":
    main()
