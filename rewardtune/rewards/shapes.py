"""Reward `shapes`: a GenEval-like verifier of the shapes benchmark (`data/shapes.py`), from pixel statistics.

The verifier reads each image the way GenEval's detector-based checks do (Ghosh et al., 2023), with exact pixel
statistics in place of a detector:
1. Colour quantisation. Each palette colour c gets a weight per pixel, w_c = min(on channels) - max(off channels) in
   [0, 1] (red: R - max(G, B); yellow: min(R, G) - B): linear in the fraction of the pixel the object covers, so
   blur moves weight around without changing its total. A pixel is foreground when its largest weight exceeds
   FOREGROUND (the background threshold) and takes that colour.
2. Objects. The 8-connected components of each colour's foreground; a component's soft mask is its weight over the
   component grown by one pixel (the sub-threshold edge). Components lighter than MIN_MASS x the smallest object's
   area are specks, not objects.
3. Shape, from the soft mask's central moments (x right, y down). A triangle (apex up) has its mass low and widens
   downwards: the skewness of y, E[y^3] / E[y^2]^1.5, is -0.57 for the exact shape, and the widening,
   E[y x^2] / (E[y^2]^0.5 E[x^2]), is +0.57; both are 0 for circles and squares. Their difference, the triangle
   score, is robust because blur leaves both numerators unchanged. A square's x and y are independent,
   E[x^2 y^2] / (E[x^2] E[y^2]) = 1, and blur (separable) keeps them so; a disc's ratio is 2/3. So: triangle when the
   triangle score exceeds TRIANGLE_SCORE, else square when the ratio exceeds SQUARE_RATIO, else circle.
4. Checks against the prompt's metadata: "color" (the set of colours found is the set asked for), "shape" (the
   multiset of (colour, shape) objects found is the one asked for: each object has the asked shape in the asked
   colour), "count" (as many objects as asked, extra objects of any colour included) and "relation" (position
   prompts: the centroid displacement along the relation's axis is positive and exceeds the one across it; always
   true for other categories). A sample passes when every check does.

`verifier_accuracy(size, n, seed)` measures the accuracy on renders with their own metadata, clean and degraded like a
sampler's output (`data.shapes.degrade`: 3x3 Gaussian blur, sigma 0.5 px, then Gaussian noise, std 0.1), and the
false-pass rates with a wrong caption of the same category (any, and one attribute off); docs/shapes.md gives the
numbers. Verification runs on the CPU (scipy.ndimage), about 0.4 ms an image at 16x16.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from rewardtune.conditions import Conditions
from rewardtune.data.shapes import (
    CATEGORIES,
    COLORS,
    METADATA_KEYS,
    OBJECT_SIZE,
    Scene,
    all_scenes,
    degrade,
    render_many,
)
from rewardtune.errors import PluginError
from rewardtune.rewards.base import Reward

FOREGROUND = 0.5  # a pixel is an object's when its colour weight exceeds half the full intensity
MIN_MASS = 0.3  # components lighter than this x the smallest object's area (a triangle of the least side) are specks
TRIANGLE_SCORE = 0.35  # widening - skewness above this: a triangle (exact 1.13, circles and squares 0)
SQUARE_RATIO = 0.88  # E[x^2 y^2] / (E[x^2] E[y^2]) above this: a square (exact 1), else a circle (exact 2/3)
CHECKS = ("color", "shape", "count", "relation")
_ON = {name: np.array(rgb) > 0 for name, rgb in COLORS.items()}  # which channels each palette colour lights


@dataclass(frozen=True)
class Detection:
    """An object found in an image: its colour and shape, centroid (pixels, x right, y down), soft mass (pixels) and
    the shape statistics of the module docstring (skewness of y, widening, moment ratio)."""

    color: str
    shape: str
    x: float
    y: float
    mass: float
    skew: float
    widening: float
    ratio: float


def color_weights(image: np.ndarray) -> np.ndarray:
    """Per-colour weights of an image [3, H, W] in [0, 1]: [K, H, W] in [0, 1], K = len(COLORS), palette order."""
    weights = []
    for on in _ON.values():
        lit = image[on].min(axis=0)
        dark = image[~on].max(axis=0) if (~on).any() else 0.0
        weights.append(np.clip(lit - dark, 0.0, 1.0))
    return np.stack(weights)


def _classify(skew: float, widening: float, ratio: float) -> str:
    if widening - skew > TRIANGLE_SCORE:
        return "triangle"
    return "square" if ratio > SQUARE_RATIO else "circle"


def _moments(w: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """(x, y, mass, skew, widening, ratio) of a soft mask w [H, W] (step 3 of the module docstring)."""
    ys, xs = np.mgrid[0 : w.shape[0], 0 : w.shape[1]].astype(np.float64)
    mass = w.sum()
    cx, cy = (w * xs).sum() / mass, (w * ys).sum() / mass
    dx, dy = xs - cx, ys - cy
    var_x, var_y = (w * dx**2).sum() / mass, (w * dy**2).sum() / mass
    skew = (w * dy**3).sum() / mass / max(var_y, 1e-9) ** 1.5
    widening = (w * dy * dx**2).sum() / mass / max(var_y**0.5 * var_x, 1e-9)
    ratio = (w * dx**2 * dy**2).sum() / mass / max(var_x * var_y, 1e-9)
    return float(cx), float(cy), float(mass), float(skew), float(widening), float(ratio)


def detect_objects(image: torch.Tensor) -> list[Detection]:
    """The objects in one image [3, H, W] in [-1, 1] (steps 1-3 of the module docstring), heaviest first.

    Bright blobs no palette colour explains (white, magenta, a muddle of colours) are objects too, of colour and shape
    "other": they fail the colour, shape and count checks, as an extra object should."""
    from scipy import ndimage

    grow = np.ones((3, 3), dtype=bool)  # 8-connectivity, and one-pixel growth
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy().astype(np.float64)  # [3, H, W] in [0, 1]
    weights = color_weights(pixels)  # [K, H, W]
    best = weights.argmax(axis=0)  # [H, W]
    foreground = weights.max(axis=0) > FOREGROUND
    min_mass = MIN_MASS * (OBJECT_SIZE[0] * image.shape[-1]) ** 2 / 2
    components = []  # (colour, soft weights, mask)
    for k, name in enumerate(COLORS):
        labels, count = ndimage.label(foreground & (best == k), structure=grow)
        components += [(name, weights[k], labels == i) for i in range(1, count + 1)]
    # Step 2's unexplained rest: bright pixels away from every palette component.
    brightness = pixels.max(axis=0)  # [H, W]
    rest = (brightness > FOREGROUND) & ~ndimage.binary_dilation(foreground, structure=grow)
    labels, count = ndimage.label(rest, structure=grow)
    components += [("other", brightness, labels == i) for i in range(1, count + 1)]
    taken = np.zeros_like(foreground)
    for _, _, mask in components:
        taken |= mask
    found = []
    for name, soft, mask in components:
        region = ndimage.binary_dilation(mask, structure=grow) & (mask | ~taken)  # the sub-threshold edge, not others'
        w = np.where(region, soft, 0.0)
        if w.sum() < min_mass:
            continue
        x, y, mass, skew, widening, ratio = _moments(w)
        shape = "other" if name == "other" else _classify(skew, widening, ratio)
        found.append(Detection(name, shape, x, y, mass, skew, widening, ratio))
    return sorted(found, key=lambda d: -d.mass)


def _relation_found(detections: list[Detection], scene: Scene) -> bool:
    """Whether objects[0] is `scene.relation` objects[1], from the centroids of the one detection of each."""
    first = [d for d in detections if (d.color, d.shape) == (scene.objects[0].color, scene.objects[0].shape)]
    second = [d for d in detections if (d.color, d.shape) == (scene.objects[1].color, scene.objects[1].shape)]
    if len(first) != 1 or len(second) != 1:
        return False
    dx, dy = second[0].x - first[0].x, second[0].y - first[0].y  # B - A
    along = {"left_of": dx, "right_of": -dx, "above": dy, "below": -dy}[scene.relation]
    across = abs(dy) if scene.relation in ("left_of", "right_of") else abs(dx)
    return along > across


def check_scene(detections: list[Detection], scene: Scene) -> dict[str, bool]:
    """The four checks of `detections` against `scene` (step 4 of the module docstring)."""
    wanted = scene.instances()
    found = Counter((d.color, d.shape) for d in detections)
    return {
        "color": {d.color for d in detections} == {o.color for o in wanted},
        "shape": found == Counter((o.color, o.shape) for o in wanted),
        "count": len(detections) == len(wanted),
        "relation": scene.relation is None or _relation_found(detections, scene),
    }


def verify(images: torch.Tensor, metadata: Sequence[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GenEval-like pass/fail of each image against its prompt's metadata.

    Args:
        images: [B, 3, H, W] in [-1, 1] (values outside are clamped).
        metadata: B metadata dicts (`data/shapes.py` schema).

    Returns:
        passed: bool [B], every check passed.
        details: bool [B] per check ("color", "shape", "count", "relation"; "relation" is true without one),
            "fraction": float [B] the fraction of the prompt's checks passed (three, or four with a relation),
            "num_objects": int64 [B] objects found.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"shapes verifier needs RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
    if len(metadata) != images.shape[0]:
        raise ValueError(f"shapes verifier got {images.shape[0]} images but {len(metadata)} metadata dicts")
    rows, counts, fractions = [], [], []
    for image, meta in zip(images, metadata):
        scene = Scene.from_metadata(meta)
        detections = detect_objects(image)
        checks = check_scene(detections, scene)
        rows.append([checks[c] for c in CHECKS])
        counts.append(len(detections))
        asked = [c for c in CHECKS if c != "relation" or scene.relation is not None]
        fractions.append(sum(checks[c] for c in asked) / len(asked))
    table = torch.tensor(rows, dtype=torch.bool).view(-1, len(CHECKS))  # [B, 4]
    details = {c: table[:, i] for i, c in enumerate(CHECKS)}
    details["fraction"] = torch.tensor(fractions, dtype=torch.float32)
    details["num_objects"] = torch.tensor(counts, dtype=torch.long)
    return table.all(dim=1), details


def _attributes(scene: Scene) -> list:
    """[colour, shape] of each object, then the relation: what a near miss changes one of."""
    return [a for o in scene.objects for a in (o.color, o.shape)] + [scene.relation]


def _wrong_scene(scene: Scene, choices: list[Scene], generator: torch.Generator, near: bool) -> Scene:
    """A scene of the same category that shows something else (not `scene` said another way); with `near`, one that
    differs in one attribute only (one object's colour or shape, or the relation)."""
    others = [s for s in choices if s.canonical() != scene.canonical()]
    if near:
        others = [s for s in others if sum(a != b for a, b in zip(_attributes(s), _attributes(scene))) == 1]
    return others[int(torch.randint(0, len(others), (1,), generator=generator))]


def verifier_accuracy(
    size: int = 16, n: int = 2000, seed: int = 0, *, noise_std: float = 0.1, blur_sigma: float = 0.5
) -> dict[str, float]:
    """Accuracy and false-pass rates of `verify`, per category, on n renders per category (prompts drawn uniformly).

    Returns, per category ("<key>/<category>") and pooled ("<key>"), the fraction of renders that pass:
    - "accuracy": against their own metadata (higher is better);
    - "false_pass": against a wrong prompt of the same category (one showing something else, not the same scene
      said another way);
    - "near_miss_false_pass": against a wrong prompt of the same category that differs in one attribute only (one
      object's colour or shape, or the relation);
    and the same three as "noisy_<key>" on the renders `degrade`d with `noise_std` and `blur_sigma`.
    """
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, float] = {}
    pooled: dict[str, list[torch.Tensor]] = {}
    for category in CATEGORIES:
        choices = all_scenes([category])
        scenes = [choices[i] for i in torch.randint(0, len(choices), (n,), generator=generator).tolist()]
        asked = {
            "accuracy": [s.metadata() for s in scenes],
            "false_pass": [_wrong_scene(s, choices, generator, near=False).metadata() for s in scenes],
            "near_miss_false_pass": [_wrong_scene(s, choices, generator, near=True).metadata() for s in scenes],
        }
        clean = render_many(scenes, size, generator)
        noisy = degrade(clean, generator, noise_std, blur_sigma)
        for prefix, images in (("", clean), ("noisy_", noisy)):
            for key, metadata in asked.items():
                passed = verify(images, metadata)[0]
                results[f"{prefix}{key}/{category}"] = float(passed.float().mean())
                pooled.setdefault(f"{prefix}{key}", []).append(passed)
    results.update({key: float(torch.cat(parts).float().mean()) for key, parts in pooled.items()})
    return results


class ShapesReward(Reward):
    """r(x, c) = 1.0 when `verify` passes x against c's metadata, else 0.0: [B] float32 on x's device. With
    `partial`, r is the fraction of the prompt's checks passed (colour, shape, count and, for position prompts,
    relation): a denser reward that is 1.0 exactly when the sample passes."""

    name: ClassVar[str] = "shapes"
    differentiable: ClassVar[bool] = False
    learns: ClassVar[bool] = False
    metadata_keys: ClassVar[frozenset[str]] = METADATA_KEYS  # the per-prompt metadata it reads (data/shapes.py)

    def __init__(self, *, partial: bool = False) -> None:
        super().__init__()
        self.partial = partial

    def _metadata(self, x: torch.Tensor, context) -> tuple[dict, ...]:
        """The samples' metadata, checked against the schema (PluginError naming the first bad sample)."""
        if not isinstance(context, Conditions) or context.metadata is None:
            raise PluginError("reward 'shapes' needs each sample's prompt metadata; add a [conditions] prompt source")
        if len(context.metadata) != x.shape[0]:
            raise PluginError(f"reward 'shapes' got {x.shape[0]} samples but {len(context.metadata)} metadata dicts")
        for i, metadata in enumerate(context.metadata):
            try:
                Scene.from_metadata(metadata)
            except ValueError as err:
                message = f"reward 'shapes': the metadata of sample {i} is off the shapes schema: {err}"
                raise PluginError(message) from None
        return context.metadata

    @torch.no_grad()
    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        passed, details = verify(x, self._metadata(x, context))
        score = details["fraction"] if self.partial else passed.float()
        return score.to(x.device)

    @torch.no_grad()
    def evaluation_metrics(self, x: torch.Tensor, context=None) -> dict[str, float]:
        """"accuracy/<category>" (the fraction of samples that pass) for each category present, and "accuracy", their
        mean over categories (GenEval's overall score: the 528 position prompts do not outweigh the 12 single-object
        ones); {} without context."""
        if context is None:
            return {}
        metadata = self._metadata(x, context)
        passed = verify(x, metadata)[0]
        categories = [m["category"] for m in metadata]
        metrics = {}
        for category in CATEGORIES:
            rows = [i for i, c in enumerate(categories) if c == category]
            if rows:
                metrics[f"accuracy/{category}"] = float(passed[rows].float().mean())
        return {"accuracy": sum(metrics.values()) / len(metrics), **metrics}


def build_shapes_reward(*, partial: bool = False) -> ShapesReward:
    """Reward `shapes`: 1.0 when the shapes verifier passes a sample against its prompt, else 0.0; with
    `partial = true`, the fraction of the prompt's checks (colour, shape, count, relation) passed."""
    return ShapesReward(partial=partial)


__all__ = [
    "Detection",
    "ShapesReward",
    "build_shapes_reward",
    "detect_objects",
    "verifier_accuracy",
    "verify",
]
