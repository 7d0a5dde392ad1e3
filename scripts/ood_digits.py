"""Out-of-distribution AUROC of learned digits energies: the held-out digits against uniform noise and blurred digits.

    python scripts/ood_digits.py RUN [RUN ...] [--blur-sigma 1.0] [--seed 0]

Each RUN is a finished run whose reward learns an energy (DxMI's `energy`, DDAEBM's `time_energy`). The score is the
run's reward r(x), higher for more data-like x: -E(x) for DxMI's energy, E(x, 0) for DDAEBM's (p ∝ exp(+E)). The
in-distribution set is sklearn's digits test split (the 297 images after the first 1,500, `[data] split = "test"`);
the out-of-distribution sets are uniform noise on [-1, 1]^64 (as many) and the same test digits blurred by a Gaussian
of standard deviation `--blur-sigma` pixels (3x3 kernel). Prints a markdown table of AUROC (in = positive class).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from sklearn.metrics import roc_auc_score

from rewardtune.api import load_run
from rewardtune.data.images import build_digits


def ood_sets(seed: int, blur_sigma: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(held-out digits [297, 1, 8, 8], {name: out-of-distribution images}) in [-1, 1]."""
    from torchvision.transforms.functional import gaussian_blur

    test = build_digits(split="test").images
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(test.shape, generator=gen) * 2 - 1
    blurred = gaussian_blur(test, kernel_size=3, sigma=blur_sigma)
    return test, {"uniform noise": noise, f"blurred (sigma {blur_sigma:g} px)": blurred}


@torch.no_grad()
def auroc(reward, device, inside: torch.Tensor, outside: torch.Tensor) -> float:
    """ROC AUC of the reward's scores, `inside` the positive class."""
    s_in, s_out = (reward(x.to(device)).double().cpu() for x in (inside, outside))
    labels = [1] * len(s_in) + [0] * len(s_out)
    return float(roc_auc_score(labels, torch.cat([s_in, s_out]).numpy()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--blur-sigma", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    inside, outsides = ood_sets(args.seed, args.blur_sigma)
    print("| run | reward | " + " | ".join(f"AUROC vs {name}" for name in outsides) + " |")
    print("|---|---|" + "---|" * len(outsides))
    for run in args.runs:
        trainer = load_run(run)
        reward = trainer.reward
        if reward is None or not getattr(reward, "learns", False):
            raise SystemExit(f"{run}: its reward is not a learned energy")
        reward.eval()
        figures = [auroc(reward, trainer.device, inside, out) for out in outsides.values()]
        print(f"| {run} | {getattr(reward, 'name', type(reward).__name__)} | " + " | ".join(f"{a:.3f}" for a in figures) + " |")


if __name__ == "__main__":
    main()
