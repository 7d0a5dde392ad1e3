"""The floor of the 8-Gaussians metrics: SW between two independent data samples and the AUC of the true density,
with the evaluator's settings (10k vs 10k, 1,000 projections, 5 samplings). Usage: python scripts/sw_floor.py"""

import statistics

import torch

from rewardtune.data.toy import EightGaussians
from rewardtune.metrics.auc import energy_auc, uniform_box
from rewardtune.metrics.sliced_wasserstein import sliced_wasserstein

data = EightGaussians()
gen = torch.Generator().manual_seed(0)
sws = [sliced_wasserstein(data.sample(10000, gen), data.sample(10000, gen), generator=gen) for _ in range(25)]
print(f"SW(data, data): mean {statistics.mean(sws):.4f}, std {statistics.pstdev(sws):.4f} over {len(sws)} samplings")
real, noise = data.sample(10000, gen), uniform_box(10000, 2, 4.1, gen)
print(f"AUC of the true density: {energy_auc(-data.log_density(real), -data.log_density(noise)):.4f}")
