"""The offline prompt-alignment benchmark "shapes": coloured circles, squares and triangles on black, with captions.

A GenEval-like benchmark (Ghosh et al., 2023, "GenEval: an object-focused framework for evaluating text-to-image
alignment") that needs no network: small RGB images (16x16 by default) with one or two objects, each with a caption
generated from the same parameters. `rewards/shapes.py` checks colour, shape, count and relative position from the
pixels. docs/shapes.md describes the benchmark and the verifier's measured accuracy.

Categories, with a caption of each:
- "single": one object, "a red circle";
- "count": two objects of the same colour and shape, "two yellow circles";
- "two_objects": two different objects anywhere, "a red circle and a blue square";
- "position": "a blue square to the left of a green triangle" (left_of, right_of, above, below).

Metadata of a prompt (a JSON object with exactly the keys of `METADATA_KEYS`):
- "category": one of `CATEGORIES`;
- "objects": list of {"color": one of `COLORS`, "shape": one of `SHAPES`}, the distinct objects asked for in caption
  order: one for "single" and "count", two (different) for "two_objects" and "position";
- "count": how many instances of each listed object the image holds: 2 for "count", else 1;
- "relation": for "position", one of `RELATIONS`, the place of objects[0] relative to objects[1]; else null (None).

Images are drawn with PIL at 4x the size and box-filtered down (anti-aliased edges), in [-1, 1]; a black
background. Object sizes and places are random (from an explicit generator) within constraints that keep every
object inside the image, objects apart by a gap, and a position prompt's relation true by a margin.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from rewardtune.conditions import Conditions
from rewardtune.data.images import TensorImages

COLORS: dict[str, tuple[int, int, int]] = {  # saturated RGB corners, far apart after quantisation to the palette
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
SHAPES = ("circle", "square", "triangle")  # triangles point up
RELATIONS = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
CATEGORIES = ("single", "count", "two_objects", "position")
METADATA_KEYS = frozenset({"category", "objects", "count", "relation"})
OBJECT_KEYS = frozenset({"color", "shape"})

MIN_SIZE = 16  # smaller images leave too few pixels per object for the verifier
OBJECT_SIZE = (0.32, 0.42)  # an object's side (bounding box), as a fraction of the image size
BORDER = 0.03  # least distance of an object from the image edge (fraction of the size; 0.5 px at 16)
GAP = 0.125  # least gap between two objects' boxes along x or y (2 px at 16: blur does not join them)
RELATION_MARGIN = 0.15  # a relation's axis displacement exceeds the other axis's by this (fraction of the size)
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges
CANDIDATES = 64  # layouts drawn per try; the first one that satisfies the constraints is kept
MAX_TRIES = 50


@dataclass(frozen=True)
class ShapeObject:
    """One kind of object: a colour (a key of COLORS) and a shape (one of SHAPES)."""

    color: str
    shape: str

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; known: {', '.join(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")

    def phrase(self, plural: bool = False) -> str:
        return f"{self.color} {self.shape}s" if plural else f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for: its category, the distinct objects (caption order) and, for "position", the relation
    of objects[0] to objects[1]."""

    category: str
    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; known: {', '.join(CATEGORIES)}")
        wanted = 1 if self.category in ("single", "count") else 2
        if len(self.objects) != wanted:
            raise ValueError(f"a {self.category!r} scene has {wanted} object(s), got {len(self.objects)}")
        if wanted == 2 and self.objects[0] == self.objects[1]:
            raise ValueError(f"a {self.category!r} scene needs two different objects, got {self.objects[0]} twice")
        if (self.relation is not None) != (self.category == "position"):
            raise ValueError(
                f"relation must be set exactly for 'position' scenes, got {self.relation!r} for {self.category!r}"
            )
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; known: {', '.join(RELATIONS)}")

    @property
    def count(self) -> int:
        """Instances of each listed object."""
        return 2 if self.category == "count" else 1

    def instances(self) -> list[ShapeObject]:
        """Every object the image holds: [A] (single), [A, A] (count), [A, B] (two objects, position)."""
        return [obj for obj in self.objects for _ in range(self.count)]

    def caption(self) -> str:
        first = self.objects[0]
        if self.category == "single":
            return f"a {first.phrase()}"
        if self.category == "count":
            return f"two {first.phrase(plural=True)}"
        if self.category == "two_objects":
            return f"a {first.phrase()} and a {self.objects[1].phrase()}"
        return f"a {first.phrase()} {RELATIONS[self.relation]} a {self.objects[1].phrase()}"

    def metadata(self) -> dict:
        """The JSON-able metadata of the module docstring's schema."""
        return {
            "category": self.category,
            "objects": [{"color": o.color, "shape": o.shape} for o in self.objects],
            "count": self.count,
            "relation": self.relation,
        }

    @classmethod
    def from_metadata(cls, metadata: dict) -> Scene:
        """The scene a metadata dict describes; ValueError naming the problem for keys or values off the schema."""
        if not isinstance(metadata, dict):
            # ValueError, not TypeError: prompt-file loaders catch one error type for every malformed record
            raise ValueError(f"shapes metadata must be a dict, got {type(metadata).__name__}")  # noqa: TRY004
        keys = set(metadata)
        if keys != METADATA_KEYS:
            unknown, missing = sorted(keys - METADATA_KEYS), sorted(METADATA_KEYS - keys)
            raise ValueError(
                f"shapes metadata keys must be {sorted(METADATA_KEYS)}: unknown {unknown}, missing {missing}"
            )
        objects = metadata["objects"]
        listed = isinstance(objects, list | tuple)
        if not listed or not all(isinstance(o, dict) and set(o) == OBJECT_KEYS for o in objects):
            raise ValueError(f"shapes metadata 'objects' must be a list of {{'color', 'shape'}} dicts, got {objects!r}")
        kinds = tuple(ShapeObject(o["color"], o["shape"]) for o in objects)
        scene = cls(metadata["category"], kinds, metadata["relation"])
        if metadata["count"] != scene.count:
            raise ValueError(
                f"shapes metadata 'count' must be {scene.count} for {scene.category!r}, got {metadata['count']!r}"
            )
        return scene

    def canonical(self) -> Scene:
        """The same scene said one fixed way: "B right of A" is "A left of B", "B below A" is "A above B"."""
        if self.relation in ("right_of", "below"):
            flipped = "left_of" if self.relation == "right_of" else "above"
            return Scene(self.category, self.objects[::-1], flipped)
        return self


# ---- prompts ------------------------------------------------------------------------------------------------------
Prompt = tuple[str, dict]  # (caption, metadata)


def all_objects() -> list[ShapeObject]:
    return [ShapeObject(c, s) for c in COLORS for s in SHAPES]


def all_scenes(categories: Sequence[str] = CATEGORIES) -> list[Scene]:
    """Every scene of `categories`, in a fixed order: objects (colour-major), unordered pairs for "two_objects",
    ordered pairs times relations for "position" (12, 12, 66 and 528 scenes with 4 colours and 3 shapes)."""
    objects = all_objects()
    scenes = []
    for category in categories:
        if category in ("single", "count"):
            scenes += [Scene(category, (o,)) for o in objects]
        elif category == "two_objects":
            scenes += [Scene(category, (a, b)) for i, a in enumerate(objects) for b in objects[i + 1 :]]
        elif category == "position":
            scenes += [Scene(category, (a, b), r) for a in objects for b in objects if a != b for r in RELATIONS]
        else:
            raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    return scenes


def all_prompts(categories: Sequence[str] = CATEGORIES) -> list[Prompt]:
    """Every prompt of `categories` as (caption, metadata) pairs, in `all_scenes` order."""
    return [(s.caption(), s.metadata()) for s in all_scenes(categories)]


def split_scenes(held_out_fraction: float = 0.25, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """(train, held_out) scenes. Per category, the scenes are grouped by what they show (`Scene.canonical`: "A left
    of B" and "B right of A" are one group) and round(fraction x groups) groups, at least one and never all, are held
    out, chosen by a permutation seeded with `seed`. So every category has held-out prompts, and no held-out prompt
    describes a scene some train prompt describes. Both lists keep `all_scenes` order."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    generator = torch.Generator().manual_seed(seed)
    held_out_groups: set[Scene] = set()
    for category in CATEGORIES:
        groups = list(dict.fromkeys(s.canonical() for s in all_scenes([category])))  # first-seen order
        num_held = min(len(groups) - 1, max(1, round(held_out_fraction * len(groups))))
        order = torch.randperm(len(groups), generator=generator).tolist()
        held_out_groups.update(groups[i] for i in order[:num_held])
    scenes = all_scenes()
    train = [s for s in scenes if s.canonical() not in held_out_groups]
    held_out = [s for s in scenes if s.canonical() in held_out_groups]
    return train, held_out


def split_prompts(held_out_fraction: float = 0.25, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held_out) prompts as (caption, metadata) pairs; see `split_scenes`."""
    train, held_out = split_scenes(held_out_fraction, seed)
    return [(s.caption(), s.metadata()) for s in train], [(s.caption(), s.metadata()) for s in held_out]


# ---- rendering ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """An object's place in an image: its box's centre (x right, y down) and side, in pixels."""

    obj: ShapeObject
    x: float
    y: float
    side: float


def _as_generator(generator: torch.Generator | int) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


def _relation_holds(dx: torch.Tensor, dy: torch.Tensor, relation: str, margin: float) -> torch.Tensor:
    """Whether A (displaced by (dx, dy) = B - A from B) is `relation` B with the axis displacement exceeding the
    other axis's by `margin` (y points down)."""
    along = {"left_of": dx, "right_of": -dx, "above": dy, "below": -dy}[relation]
    across = dy.abs() if relation in ("left_of", "right_of") else dx.abs()
    return along >= across + margin


def layout(scene: Scene, size: int, generator: torch.Generator | int) -> list[Placement]:
    """Random places for `scene.instances()` in a size x size image: inside the image by BORDER, boxes apart by GAP
    along x or y, and a position scene's relation true by RELATION_MARGIN (rejection sampling, CANDIDATES at a time,
    deterministic given the generator)."""
    generator = _as_generator(generator)
    instances = scene.instances()
    lo, hi = OBJECT_SIZE
    border = BORDER * size
    for _ in range(MAX_TRIES):
        u = torch.rand(CANDIDATES, len(instances), 3, generator=generator, dtype=torch.float64)
        side = (lo + (hi - lo) * u[..., 0]) * size  # [K, n]
        free = size - 2 * border - side  # room for the box's corner along each axis
        x = border + u[..., 1] * free + side / 2  # [K, n] centres
        y = border + u[..., 2] * free + side / 2
        valid = torch.ones(CANDIDATES, dtype=torch.bool)
        if len(instances) == 2:
            half = (side[:, 0] + side[:, 1]) / 2
            dx, dy = x[:, 1] - x[:, 0], y[:, 1] - y[:, 0]
            valid &= torch.maximum(dx.abs() - half, dy.abs() - half) >= GAP * size
            if scene.relation is not None:
                valid &= _relation_holds(dx, dy, scene.relation, RELATION_MARGIN * size)
        if valid.any():
            k = int(valid.nonzero()[0, 0])
            return [Placement(o, float(x[k, i]), float(y[k, i]), float(side[k, i])) for i, o in enumerate(instances)]
    raise RuntimeError(f"no layout found for {scene.caption()!r} at size {size} in {MAX_TRIES * CANDIDATES} draws")


def draw(placements: Sequence[Placement], size: int) -> np.ndarray:
    """The image of `placements`: uint8 [size, size, 3] (anti-aliased: drawn at SUPERSAMPLE x and box-filtered)."""
    from PIL import Image, ImageDraw

    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big))
    pen = ImageDraw.Draw(image)
    for p in placements:
        x0, y0 = (p.x - p.side / 2) * SUPERSAMPLE, (p.y - p.side / 2) * SUPERSAMPLE
        x1, y1 = x0 + p.side * SUPERSAMPLE, y0 + p.side * SUPERSAMPLE
        fill = COLORS[p.obj.color]
        if p.obj.shape == "triangle":
            pen.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
        else:  # PIL's boxes include both end pixels
            box = [round(x0), round(y0), round(x1) - 1, round(y1) - 1]
            (pen.ellipse if p.obj.shape == "circle" else pen.rectangle)(box, fill=fill)
    return np.asarray(image.reduce(SUPERSAMPLE))


def check_size(size: int) -> None:
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"shapes images need size >= {MIN_SIZE} pixels, got {size!r}")


def render_many(scenes: Sequence[Scene], size: int, generator: torch.Generator | int) -> torch.Tensor:
    """Images of `scenes`, one each, in order: [N, 3, size, size] float in [-1, 1] (deterministic given the
    generator; the same as `render` called on each scene in turn with that generator)."""
    check_size(size)
    generator = _as_generator(generator)
    pixels = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        pixels[i] = draw(layout(scene, size, generator), size)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()


def render(scene: Scene, size: int, generator: torch.Generator | int) -> torch.Tensor:
    """One image of `scene`: [3, size, size] float in [-1, 1]; `generator` is a torch.Generator (advanced) or a seed."""
    return render_many([scene], size, generator)[0]


def degrade(
    images: torch.Tensor, generator: torch.Generator, noise_std: float = 0.1, blur_sigma: float = 0.5
) -> torch.Tensor:
    """A sampler-like version of clean images [B, 3, H, W] in [-1, 1]: a 3x3 Gaussian blur (`blur_sigma` px, edges
    replicated), then Gaussian noise of std `noise_std` (none drawn when 0), clamped to [-1, 1]."""
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * blur_sigma**2))
    kernel = torch.outer(taps, taps) / taps.sum() ** 2  # [3, 3], sums to 1
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    blurred = F.conv2d(padded, kernel.expand(3, 1, 3, 3).contiguous(), groups=3)
    if noise_std == 0:
        return blurred.clamp(-1, 1)
    noise = torch.randn(images.shape, generator=generator)
    return (blurred + noise_std * noise).clamp(-1, 1)


# ---- the data source ----------------------------------------------------------------------------------------------
class ShapesImages(TensorImages):
    """Rendered scenes with their captions and metadata (one per image). `sample_conditioned` draws the same rows as
    `sample` does from the same generator state, with their `Conditions`. No horizontal flips: they would swap
    "left of" and "right of"."""

    def __init__(
        self, images: torch.Tensor, captions: Sequence[str], metadata: Sequence[dict], *, name: str = "shapes"
    ) -> None:
        super().__init__(images, hflip=False, name=name)
        if not len(captions) == len(metadata) == len(self):
            sizes = f"{len(self)} images, {len(captions)} captions and {len(metadata)} metadata dicts"
            raise ValueError(f"{name}: {sizes} differ")
        self.captions = list(captions)
        self.metadata = list(metadata)

    def sample_conditioned(
        self, n: int, generator: torch.Generator | None = None, device="cpu"
    ) -> tuple[torch.Tensor, Conditions]:
        """n rows drawn with replacement: images [n, 3, H, W] on `device` and their prompts and metadata."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        rows = idx.tolist()
        conditions = Conditions.from_prompts([self.captions[i] for i in rows], [self.metadata[i] for i in rows])
        return self.images[idx].to(device), conditions


def build_shapes(
    *,
    size: int = 16,
    num_images: int = 20000,
    seed: int = 0,
    split: Literal["train", "held_out", "all"] = "train",
    held_out_fraction: float = 0.25,
    split_seed: int = 0,
    balance: Literal["prompt", "category"] = "prompt",
) -> ShapesImages:
    """Data `shapes`: `num_images` renders of the prompts of `split`, drawn at `seed`; the split is
    `split_prompts(held_out_fraction, split_seed)`, the one the files under recipes/prompts/shapes/ hold.

    `balance` = "prompt" renders each prompt equally often (up to one image), so the categories come in proportion
    to their prompt counts (position prompts are 85% of them); "category" gives each category an equal share of
    the images (up to one) and, within it, each prompt equally often (`balanced_order`).
    """
    check_size(size)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    if balance not in ("prompt", "category"):
        raise ValueError(f"balance must be 'prompt' or 'category', got {balance!r}")
    images, captions, metadata = rendered_set(size, num_images, seed, split, held_out_fraction, split_seed, balance)
    return ShapesImages(images, list(captions), [dict(m) for m in metadata], name=f"shapes {split}")


@functools.lru_cache(maxsize=2)
def rendered_set(size: int, num_images: int, seed: int, split: str, held_out_fraction: float, split_seed: int,
                 balance: str) -> tuple[torch.Tensor, tuple[str, ...], tuple[dict, ...]]:
    """`build_shapes`' renders, captions and metadata, cached in the process (rendering 20,000 images takes seconds;
    several recipes of a process, or a run and its evaluator, ask for the same set). The images are shared between
    callers and read only (`ShapesImages` indexes them, never writes)."""
    train, held_out = split_scenes(held_out_fraction, split_seed)
    scenes = {"train": train, "held_out": held_out, "all": train + held_out}[split]
    generator = torch.Generator().manual_seed(seed)
    if balance == "prompt":
        order = balanced_order(len(scenes), num_images, generator)
        chosen = [scenes[i] for i in order.tolist()]
    else:
        chosen = balanced_by_category(scenes, num_images, generator)
    images = render_many(chosen, size, generator)
    return images, tuple(s.caption() for s in chosen), tuple(s.metadata() for s in chosen)


def balanced_order(num_items: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n indices into num_items items, each item equally often up to one: whole random permutations, the last cut."""
    repeats = math.ceil(n / num_items)
    return torch.cat([torch.randperm(num_items, generator=generator) for _ in range(repeats)])[:n]


def balanced_by_category(scenes: Sequence[Scene], n: int, generator: torch.Generator) -> list[Scene]:
    """n scenes, each category of `scenes` equally often up to one (the first categories of CATEGORIES get the
    remainder) and each scene within its category equally often up to one, shuffled."""
    present = [c for c in CATEGORIES if any(s.category == c for s in scenes)]
    chosen = []
    for i, category in enumerate(present):
        members = [s for s in scenes if s.category == category]
        share = n // len(present) + (1 if i < n % len(present) else 0)
        chosen += [members[j] for j in balanced_order(len(members), share, generator).tolist()]
    return [chosen[j] for j in torch.randperm(len(chosen), generator=generator).tolist()]
