"""A small CNN classifier of sklearn's 8x8 digits, trained reproducibly on first use and cached.

It serves as an offline feature extractor for FID on digits (its 64-d penultimate layer) and as the classifier of
the digits classifier reward. Training: the first 1,500 digits (the rest are held out), 400 Adam steps at seed 0,
a few seconds on a CPU; held-out accuracy is about 96%. Weights are cached as safetensors under
$REWARDTUNE_CACHE (default ~/.cache/rewardtune).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.nets.cache import cached_network

TRAIN_COUNT = 1500


class DigitsClassifier(nn.Module):
    """[B, 1, 8, 8] in [-1, 1] -> logits [B, 10]; `features` gives the 64-d penultimate activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 64)
        self.out = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # [B, 64, 4, 4]
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def train_digits_classifier(steps: int = 400, seed: int = 0) -> DigitsClassifier:
    """Train on the first 1,500 digits with a fixed seed (deterministic on a given machine)."""
    from sklearn.datasets import load_digits

    from rewardtune.data.images import load_digits_images

    images = load_digits_images()[:TRAIN_COUNT]
    labels = torch.from_numpy(load_digits().target[:TRAIN_COUNT]).long()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(0, TRAIN_COUNT, (128,), generator=gen)
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # +-1 pixel shifts: a little augmentation
        x = torch.roll(images[idx], shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def load_digits_classifier() -> DigitsClassifier:
    """The cached classifier (trained and cached on first use)."""
    return cached_network("digits_classifier.safetensors", DigitsClassifier, train_digits_classifier)


def held_out_accuracy(model: DigitsClassifier) -> float:
    from sklearn.datasets import load_digits

    from rewardtune.data.images import load_digits_images

    images = load_digits_images()[TRAIN_COUNT:]
    labels = torch.from_numpy(load_digits().target[TRAIN_COUNT:]).long()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())
