"""A small CNN that reads shapes-benchmark images (`data/shapes.py`), trained reproducibly on first use and cached.

It serves as the offline feature extractor for Fréchet distances on shapes images (`metrics/fid.py`, name
"shapes"): its 128-d penultimate layer. It learns what a prompt asks for, from procedural renders: the kinds (colour
x shape, 12) of the image's objects in kind order, with "none" for a missing second object (so kinds and count),
and for position scenes the relation of the lower-kind object to the other. Training: a pool of 6,000 renders of
the four categories in equal parts (seed 0), half of each batch degraded like a sampler's output (blur, then noise
of std up to 0.15), 900 Adam steps of 64 with a one-cycle learning rate (peak 1e-2) at seed 0, one network per
image size: about 10 s on one CPU core at 16x16, 4x that at 32x32. On a fresh pool it names every object right in
86% of 16x16 images (90% at 32x32) and the relation of 97% (96%) of position scenes (`held_out_accuracy`; most of its
errors take a small circle for a square or back). Weights are cached as safetensors under $REWARDTUNE_CACHE (default
~/.cache/rewardtune), named by size and `VERSION`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.data.shapes import (
    CATEGORIES,
    RELATIONS,
    all_objects,
    all_scenes,
    check_size,
    degrade,
    render_many,
)
from rewardtune.nets.cache import cached_network

VERSION = 1  # bump when the renderer or the training changes: older cached weights are then ignored
FEATURES = 128
POOL_SIZE = 6000
STEPS = 900
BATCH = 64
LR = 1e-2
NO_RELATION = -100  # cross_entropy's ignore_index: scenes without a relation


class ShapesClassifier(nn.Module):
    """[B, 3, S, S] in [-1, 1] -> (object logits [B, 2, K + 1], relation logits [B, 4]), K = 12 object kinds;
    `features` gives the 128-d penultimate activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURES)
        self.objects = nn.Linear(FEATURES, 2 * (len(all_objects()) + 1))
        self.relation = nn.Linear(FEATURES, len(RELATIONS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.adaptive_avg_pool2d(F.relu(self.conv3(h)), 4)  # [B, 64, 4, 4] for any size
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.objects(h).view(-1, 2, len(all_objects()) + 1), self.relation(h)


def scene_targets(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """Training targets: objects int64 [N, 2], the kinds (0..11) of the image's objects in kind order, 12 for "no
    second object"; relations int64 [N], the relation of the lower-kind object to the other, or NO_RELATION."""
    kinds = {obj: i for i, obj in enumerate(all_objects())}
    relation_ids = {r: i for i, r in enumerate(RELATIONS)}
    inverse = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
    objects = torch.full((len(scenes), 2), len(kinds), dtype=torch.long)
    relations = torch.full((len(scenes),), NO_RELATION, dtype=torch.long)
    for i, scene in enumerate(scenes):
        present = sorted(kinds[o] for o in scene.instances())
        objects[i, : len(present)] = torch.tensor(present)
        if scene.relation is not None:
            first, second = (kinds[o] for o in scene.objects)
            relations[i] = relation_ids[scene.relation if first < second else inverse[scene.relation]]
    return objects, relations


def training_pool(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """POOL_SIZE renders, categories in equal parts: images [N, 3, S, S] and `scene_targets`."""
    generator = torch.Generator().manual_seed(seed)
    scenes = []
    for category in CATEGORIES:
        choices = all_scenes([category])
        picks = torch.randint(0, len(choices), (POOL_SIZE // len(CATEGORIES),), generator=generator).tolist()
        scenes += [choices[i] for i in picks]
    return (render_many(scenes, size, generator), *scene_targets(scenes))


def train_shapes_classifier(size: int, steps: int | None = None, seed: int = 0) -> ShapesClassifier:
    """Train on `training_pool(size, seed)` for `steps` (default STEPS) with a fixed seed (deterministic on a given
    machine)."""
    steps = STEPS if steps is None else steps
    with torch.enable_grad():  # also when first used inside an evaluation's no_grad
        return _train(size, steps, seed)


def _train(size: int, steps: int, seed: int) -> ShapesClassifier:
    images, objects, relations = training_pool(size, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ShapesClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)  # warm-up, then cosine decay
    degraded = (torch.arange(BATCH) % 2 == 0).view(-1, 1, 1, 1)  # half of each batch, like a sampler's output
    for _ in range(steps):
        idx = torch.randint(0, len(images), (BATCH,), generator=generator)
        std = 0.15 * torch.rand(BATCH, 1, 1, 1, generator=generator)  # noise std up to 0.15
        blurred = degrade(images[idx], generator, noise_std=0.0)
        noisy = (blurred + std * torch.randn(blurred.shape, generator=generator)).clamp(-1, 1)
        x = torch.where(degraded, noisy, images[idx])
        object_logits, relation_logits = model(x)
        loss = F.cross_entropy(object_logits.flatten(0, 1), objects[idx].flatten())
        loss = loss + F.cross_entropy(relation_logits, relations[idx], ignore_index=NO_RELATION)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


def load_shapes_classifier(size: int, seed: int = 0) -> ShapesClassifier:
    """The cached classifier for size x size images trained at `seed` (trained and cached on first use). Seed 0 is
    the feature extractor of Fréchet distances; another seed gives an independently trained network of the same
    kind (e.g. a value's trunk that is not the network the evaluation measures in)."""
    check_size(size)
    name = f"shapes_classifier_v{VERSION}_{size}{'' if seed == 0 else f'_seed{seed}'}.safetensors"
    return cached_network(name, ShapesClassifier, lambda: train_shapes_classifier(size, seed=seed))


@torch.no_grad()
def held_out_accuracy(model: ShapesClassifier, size: int, seed: int = 1) -> dict[str, float]:
    """On a fresh pool (another seed): "objects" (images whose objects are all named right: kind and count) and
    "relation" (position scenes whose relation is right)."""
    images, objects, relations = training_pool(size, seed)
    object_logits, relation_logits = model(images)
    has_relation = relations != NO_RELATION
    return {
        "objects": float((object_logits.argmax(-1) == objects).all(dim=1).float().mean()),
        "relation": float((relation_logits.argmax(-1) == relations)[has_relation].float().mean()),
    }


class ShapesFeatures(nn.Module):
    """Penultimate (128-d) features of the cached shapes classifier for images [B, 3, S, S] in [-1, 1]: [B, 128].
    The classifier for size S is loaded (or trained and cached) on the first batch of that size."""

    def __init__(self) -> None:
        super().__init__()
        self.classifiers: dict[int, ShapesClassifier] = {}  # frozen, cached on disk: not submodules to save

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-1]
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"shapes features need RGB square images [B, 3, S, S], got shape {tuple(images.shape)}")
        if size not in self.classifiers:
            self.classifiers[size] = load_shapes_classifier(size)
        return self.classifiers[size].features(images.float().cpu())
