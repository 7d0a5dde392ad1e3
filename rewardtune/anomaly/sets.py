"""Anomaly-detection image sets: MVTec-AD (Bergmann et al. 2019) in UniAD's unified multi-class setting (You et al.
2022, used by DxMI §5.3), and two offline benchmarks built from sklearn's 8x8 digits.

Every set is an `AnomalySet`: normal training images only (training never sees a label), and test images with
image-level labels, per-pixel defect masks where they exist, and each test image's category and defect type.
- `load_mvtec(root)`: the MVTec-AD folder layout as the dataset ships it; `write_mvtec_layout` writes a tiny
  synthetic copy of that layout (tests use it).
- `make_digits_defects()`: synthetic local defects (scratches, blobs, erased strokes, spots) drawn on held-out digits,
  with masks that are exactly the changed pixels.
- `make_digits_novelty(held_out)`: semantic novelty, one digit class never seen in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rewardtune.errors import RecipeError

DEFECT_KINDS = ("scratch", "blob", "missing", "bright_spot", "dark_spot")
INK = 0.5  # a digits pixel (in [0, 1]) above this is ink
MAX_REDRAWS = 200  # attempts to place a visible defect
MIN_VISIBLE = 0.1  # a defect must change some pixel of the 8 x 8 area-downsampled image by this much (1.6 / 16 levels)


@dataclass
class AnomalySet:
    """Images for one anomaly-detection benchmark, all float32 in [0, 1].

    Attributes:
        name: the benchmark's name, e.g. "mvtec" or "digits_defects".
        train: [N, C, H, W] normal images only.
        test: [M, C, H, W].
        labels: [M] int64: 1 anomalous, 0 normal.
        masks: [M, H, W] bool, True on defect pixels (all False on normal images); None where there are no masks.
        categories: [M] category of each test image (the MVTec object class).
        train_categories: [N] category of each training image.
        defect_types: [M] "good" for normal test images, else the defect's name.

    Raises:
        ValueError: the fields disagree in length or shape.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    categories: list[str]
    train_categories: list[str]
    defect_types: list[str]

    def __post_init__(self) -> None:
        if self.train.dim() != 4 or self.test.dim() != 4 or self.train.shape[1:] != self.test.shape[1:]:
            raise ValueError(f"{self.name}: train {tuple(self.train.shape)} and test {tuple(self.test.shape)} must "
                             "both be [*, C, H, W] with the same C, H, W")
        m = self.test.shape[0]
        if tuple(self.labels.shape) != (m,):
            raise ValueError(f"{self.name}: labels {tuple(self.labels.shape)} for {m} test images")
        if self.masks is not None and tuple(self.masks.shape) != (m, *self.test.shape[2:]):
            raise ValueError(f"{self.name}: masks {tuple(self.masks.shape)} for test {tuple(self.test.shape)}")
        if len(self.categories) != m or len(self.defect_types) != m:
            raise ValueError(f"{self.name}: {len(self.categories)} categories and {len(self.defect_types)} defect "
                             f"types for {m} test images")
        if len(self.train_categories) != self.train.shape[0]:
            raise ValueError(f"{self.name}: {len(self.train_categories)} train categories for "
                             f"{self.train.shape[0]} train images")


# MVTec-AD --------------------------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    """The files of `folder`, sorted, hidden ones (.DS_Store, ...) left out; [] where the folder does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _read_image(path: Path, size: int) -> np.ndarray:
    """One image file as RGB, bilinearly resized: [size, size, 3] float32 in [0, 1].

    Raises:
        RecipeError: PIL cannot read the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, ValueError) as err:  # UnidentifiedImageError (an OSError) for a file that is not an image
        raise RecipeError(f"cannot read image {path}: {str(err).splitlines()[0]}") from None
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _read_mask(path: Path, size: int) -> np.ndarray:
    """One ground-truth mask file, nearest-resized and binarised (> 127): [size, size] bool.

    Raises:
        RecipeError: the mask is missing or PIL cannot read it.
    """
    from PIL import Image

    if not path.is_file():
        raise RecipeError(f"missing defect mask {path}")
    try:
        with Image.open(path) as img:
            grey = img.convert("L").resize((size, size), Image.NEAREST)
    except (OSError, ValueError) as err:
        raise RecipeError(f"cannot read mask {path}: {str(err).splitlines()[0]}") from None
    return np.asarray(grey) > 127


def _mvtec_categories(root: Path, categories: Sequence[str] | None) -> list[str]:
    """The category folders to load: all of root's (sorted) or the requested ones, each checked to exist.

    Raises:
        RecipeError: root missing, no categories, an unknown category requested.
    """
    if not root.is_dir():
        raise RecipeError(f"MVTec-AD root {root} does not exist (expected root/<category>/train/good/*.png)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if categories is None:
        categories = found
    if isinstance(categories, str):
        raise RecipeError(f"categories must be a list of names, got the string {categories!r} (root {root})")
    if not categories:
        raise RecipeError(f"no categories in MVTec-AD root {root} (expected root/<category>/train/good/*.png)")
    for name in categories:
        if name not in found:
            raise RecipeError(f"unknown MVTec-AD category {name!r}: {root / name} does not exist "
                              f"(found: {', '.join(found) or 'none'})")
    return list(categories)


def _mvtec_test_files(folder: Path) -> list[tuple[Path, str, Path | None]]:
    """(image, defect type, mask path or None for "good") for every test image of one category folder.

    Raises:
        RecipeError: the category has no test images.
    """
    entries = []
    defect_dirs = sorted(p for p in (folder / "test").glob("*") if p.is_dir() and not p.name.startswith("."))
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        for image in _image_files(defect_dir):
            mask = None if defect == "good" else folder / "ground_truth" / defect / f"{image.stem}_mask.png"
            entries.append((image, defect, mask))
    if not entries:
        raise RecipeError(f"no test images in {folder / 'test'} (expected test/<defect or good>/*.png)")
    return entries


def load_mvtec(root: str | Path, categories: Sequence[str] | None = None, image_size: int = 224) -> AnomalySet:
    """MVTec-AD as the dataset ships it, in UniAD's unified multi-class setting (every category's good training
    images together).

    Layout: root/<category>/train/good/*.png, root/<category>/test/<defect or good>/*.png and
    root/<category>/ground_truth/<defect>/<stem>_mask.png. Images are converted to RGB and bilinearly resized,
    masks nearest-resized and binarised (> 127); normal test images get all-False masks. Categories, defect folders
    and files are read in sorted order.

    Args:
        root: the MVTec-AD folder.
        categories: category folder names to load (None: every folder under root).
        image_size: images and masks are resized to image_size x image_size.

    Returns:
        An AnomalySet named "mvtec": train [N, 3, S, S], test [M, 3, S, S], masks [M, S, S] (S = image_size).

    Raises:
        RecipeError: root missing, no categories, an unknown category requested, a category without train/good
            images or without test images, a missing defect mask, an unreadable image or mask (one line naming the
            path).
        ValueError: image_size < 1.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    root = Path(root)
    names = _mvtec_categories(root, categories)
    train_files, train_categories, test_entries, categories_out = [], [], [], []
    for name in names:
        good = _image_files(root / name / "train" / "good")
        if not good:
            raise RecipeError(f"no training images in {root / name / 'train' / 'good'} (category {name!r})")
        train_files += good
        train_categories += [name] * len(good)
        entries = _mvtec_test_files(root / name)
        test_entries += entries
        categories_out += [name] * len(entries)
    train = torch.empty(len(train_files), 3, image_size, image_size)  # [N, 3, S, S], filled in place: no copies
    for i, path in enumerate(train_files):
        train[i] = torch.from_numpy(_read_image(path, image_size)).permute(2, 0, 1)
    test = torch.empty(len(test_entries), 3, image_size, image_size)  # [M, 3, S, S]
    masks = torch.zeros(len(test_entries), image_size, image_size, dtype=torch.bool)  # [M, S, S]
    for i, (path, _, mask_path) in enumerate(test_entries):
        test[i] = torch.from_numpy(_read_image(path, image_size)).permute(2, 0, 1)
        if mask_path is not None:
            masks[i] = torch.from_numpy(_read_mask(mask_path, image_size))
    defect_types = [defect for _, defect, _ in test_entries]
    labels = torch.tensor([int(d != "good") for d in defect_types], dtype=torch.long)
    return AnomalySet("mvtec", train, test, labels, masks, categories_out, train_categories, defect_types)


def _smooth_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random smooth RGB texture: [size, size, 3] uint8 in 40..200 (so a 255 defect changes every pixel)."""
    from PIL import Image

    coarse = rng.integers(40, 201, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse, "RGB").resize((size, size), Image.BILINEAR))


def write_mvtec_layout(
    root: str | Path,
    categories: Sequence[str] = ("bottle", "grid"),
    n_train: int = 4,
    n_test_good: int = 2,
    n_test_defect: int = 2,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write a tiny synthetic MVTec-AD folder in exactly the shipped layout, deterministic for a seed.

    Normal images are random smooth textures (values 40..200 of 255); a defect image is a normal texture with a
    white (255) square of side size // 4 pasted at a random place, in test/scratch/<stem>.png, its exact mask in
    ground_truth/scratch/<stem>_mask.png (255 on the square, 0 elsewhere). Stems are "000", "001", ...

    Args:
        root: the folder to write (created; existing files of the same names are overwritten).
        categories: category folder names.
        n_train, n_test_good, n_test_defect: images per category in train/good, test/good and test/scratch.
        size: image side in pixels.
        seed: seeds the textures and square positions.

    Returns:
        Path(root).

    Raises:
        ValueError: no categories, n_train < 1, a negative test count, size < 4.
    """
    from PIL import Image

    if not categories or n_train < 1 or n_test_good < 0 or n_test_defect < 0 or size < 4:
        raise ValueError(f"write_mvtec_layout needs categories, n_train >= 1, test counts >= 0 and size >= 4; got "
                         f"{list(categories)}, {n_train}, {n_test_good}, {n_test_defect}, {size}")
    root = Path(root)
    side = size // 4
    for c, name in enumerate(categories):
        rng = np.random.default_rng([seed, c])
        folders = {k: root / name / k for k in ("train/good", "test/good", "test/scratch", "ground_truth/scratch")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            Image.fromarray(_smooth_texture(rng, size), "RGB").save(folders["train/good"] / f"{i:03d}.png")
        for i in range(n_test_good):
            Image.fromarray(_smooth_texture(rng, size), "RGB").save(folders["test/good"] / f"{i:03d}.png")
        for i in range(n_test_defect):
            image = _smooth_texture(rng, size).copy()
            mask = np.zeros((size, size), dtype=np.uint8)
            top, left = rng.integers(0, size - side + 1, size=2)
            image[top:top + side, left:left + side] = 255
            mask[top:top + side, left:left + side] = 255
            Image.fromarray(image, "RGB").save(folders["test/scratch"] / f"{i:03d}.png")
            Image.fromarray(mask, "L").save(folders["ground_truth/scratch"] / f"{i:03d}_mask.png")
    return root


# Digits ----------------------------------------------------------------------------------------------------------


def _digits_split(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's digits, [0, 1], bilinearly upsampled (align_corners=False) and split at TRAIN_COUNT.

    Returns:
        (train [1500, 1, size, size], test [297, 1, size, size], train classes [1500], test classes [297] int64).
    """
    from sklearn.datasets import load_digits

    from rewardtune.nets.digits import TRAIN_COUNT

    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # [1797, 1, 8, 8], 0..16 -> [0, 1]
    images = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    classes = torch.from_numpy(digits.target).long()
    return images[:TRAIN_COUNT], images[TRAIN_COUNT:], classes[:TRAIN_COUNT], classes[TRAIN_COUNT:]


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """A uniform integer in low..high (both included)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _scaled(pixels_at_32: float, size: int) -> int:
    """A length given for 32 x 32 images, scaled to size x size (at least 1 pixel)."""
    return max(1, round(pixels_at_32 * size / 32))


def _ink_pixel(image: torch.Tensor, generator: torch.Generator) -> tuple[int, int]:
    """(row, column) of a random inked pixel of image [H, W] (the brightest pixel where nothing exceeds INK)."""
    rows, cols = torch.nonzero(image > INK, as_tuple=True)
    if rows.numel() == 0:
        flat = int(image.argmax())
        return flat // image.shape[1], flat % image.shape[1]
    k = _randint(0, rows.numel() - 1, generator)
    return int(rows[k]), int(cols[k])


def _square(size: int, top: int, left: int, side: int) -> torch.Tensor:
    """[size, size] bool, True on the square of the given side at (top, left) (clipped at the border)."""
    region = torch.zeros(size, size, dtype=torch.bool)
    region[max(top, 0):top + side, max(left, 0):left + side] = True
    return region


def _scratch_region(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A thin line segment (width 1-2 px, length 10-20 px at 32 x 32) through a random inked pixel: [H, W] bool."""
    size = image.shape[-1]
    width = _scaled(_randint(1, 2, generator), size)
    length = _scaled(_randint(10, 20, generator), size)
    angle = float(torch.rand((), generator=generator)) * math.pi
    cy, cx = _ink_pixel(image, generator)
    half = torch.tensor([math.sin(angle), math.cos(angle)]) * length / 2  # (dy, dx) from the centre to an end
    start = torch.tensor([cy, cx], dtype=torch.float32) - half
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).float()  # [H, W, 2]
    # distance of each pixel to the segment start + t * (2 * half), t clamped to [0, 1]
    t = (((grid - start) * (2 * half)).sum(-1) / (2 * half).pow(2).sum()).clamp(0, 1)  # [H, W]
    distance = (grid - start - t.unsqueeze(-1) * (2 * half)).norm(dim=-1)
    return distance <= width / 2


def _disc_region(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A filled disc of radius 3-5 px at 32 x 32, anywhere fully inside the image: [H, W] bool."""
    size = image.shape[-1]
    radius = min(_scaled(_randint(3, 5, generator), size), (size - 1) // 2)
    cy, cx = _randint(radius, size - 1 - radius, generator), _randint(radius, size - 1 - radius, generator)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2


def _patch_region(
    image: torch.Tensor, generator: torch.Generator, side_at_32: tuple[int, int], on_ink: bool
) -> torch.Tensor:
    """A square (side in side_at_32 px at 32 x 32), centred on a random inked pixel or anywhere: [H, W] bool."""
    size = image.shape[-1]
    side = min(_scaled(_randint(*side_at_32, generator), size), size)
    if on_ink:
        cy, cx = _ink_pixel(image, generator)
        return _square(size, cy - side // 2, cx - side // 2, side)
    return _square(size, _randint(0, size - side, generator), _randint(0, size - side, generator), side)


def _draw_defect(image: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """One defect of `kind` drawn on image [H, W] in [0, 1]; returns the new image [H, W] (possibly unchanged)."""
    out = image.clone()
    if kind == "scratch":
        out[_scratch_region(image, generator)] = 1.0
    elif kind == "blob":
        out[_disc_region(image, generator)] = 1.0
    elif kind == "missing":  # erase a 5-8 px patch of stroke
        out[_patch_region(image, generator, (5, 8), on_ink=True)] = 0.0
    elif kind == "bright_spot":  # a small bright square anywhere
        out[_patch_region(image, generator, (4, 6), on_ink=False)] = 1.0
    elif kind == "dark_spot":  # a small square anywhere, dark only on the ink (> INK) it covers; faint halo kept
        out[_patch_region(image, generator, (4, 6), on_ink=False) & (image > INK)] = 0.0
    else:
        raise ValueError(f"unknown defect kind {kind!r}: expected one of {', '.join(DEFECT_KINDS)}")
    return out


def _add_defect(image: torch.Tensor, kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a defect that stays visible at 8 x 8: redrawn elsewhere until area-downsampling the change to 8 x 8
    leaves some pixel changed by >= MIN_VISIBLE (a scratch along a stroke that is already white changes ~nothing).

    Returns:
        (defective image [H, W], mask [H, W] bool: exactly the pixels the defect changed, |after - before| > 1e-6).
    """
    for _ in range(MAX_REDRAWS):
        after = _draw_defect(image, kind, generator)
        change_8x8 = F.adaptive_avg_pool2d((after - image)[None, None], 8)  # [1, 1, 8, 8]
        if change_8x8.abs().max() >= MIN_VISIBLE:
            return after, (after - image).abs() > 1e-6
    raise RuntimeError(f"no visible {kind!r} defect in {MAX_REDRAWS} attempts")


def make_digits_defects(size: int = 32, seed: int = 0, num_test_normal: int | None = None) -> AnomalySet:
    """The offline "defects" benchmark: held-out digits, some with one synthetic local defect each.

    Train: the first 1,500 digits (`nets.digits.TRAIN_COUNT`); test: the other 297. Images are [0, 1] (pixel
    values 0..16 / 16), bilinearly upsampled to size x size. The test digits to corrupt are chosen by the seed, and
    defect kinds are dealt round-robin over them (every kind occurs once there are 5 defects) in a seeded order.
    Sizes at 32 x 32, scaled with `size` so defects survive 4x area downsampling to 8 x 8:
    "scratch" a bright line 1-2 px wide and 10-20 px long through an inked pixel; "blob" a bright disc of radius
    3-5; "missing" a 5-8 px square erased (set to 0) around an inked pixel; "bright_spot" a 4-6 px bright square
    anywhere; "dark_spot" a 4-6 px square anywhere that darkens (to 0) only the inked pixels (> 0.5) it covers.
    A mask is exactly the set of pixels its defect changed, never empty: a defect that changes too little (no pixel
    of the change area-downsampled to 8 x 8 reaches 0.1) is redrawn elsewhere.

    Args:
        size: image side in pixels.
        seed: seeds which test digits get defects, the kinds' order and the defects' places.
        num_test_normal: test digits left normal (None: 297 - 297 // 2 = 149, so 148 get defects).

    Returns:
        An AnomalySet named "digits_defects": train [1500, 1, size, size], test [297, 1, size, size], masks
        [297, size, size], categories ["digits"] * 297, defect_types the kind or "good".

    Raises:
        ValueError: size < 8, num_test_normal outside 0..297.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 for visible defects, got {size}")
    train, test, _, _ = _digits_split(size)
    m = test.shape[0]
    num_normal = m - m // 2 if num_test_normal is None else num_test_normal
    if not 0 <= num_normal <= m:
        raise ValueError(f"num_test_normal must be in 0..{m}, got {num_test_normal}")
    generator = torch.Generator().manual_seed(seed)
    defective = torch.randperm(m, generator=generator)[: m - num_normal].sort().values.tolist()
    order = torch.randperm(len(defective), generator=generator).tolist()
    kinds = [DEFECT_KINDS[k % len(DEFECT_KINDS)] for k in order]
    masks = torch.zeros(m, size, size, dtype=torch.bool)  # [M, H, W]
    defect_types = ["good"] * m
    test = test.clone()
    for idx, kind in zip(defective, kinds):
        test[idx, 0], masks[idx] = _add_defect(test[idx, 0], kind, generator)
        defect_types[idx] = kind
    labels = torch.tensor([int(d != "good") for d in defect_types], dtype=torch.long)
    return AnomalySet("digits_defects", train, test, labels, masks, ["digits"] * m, ["digits"] * len(train),
                      defect_types)


def make_digits_novelty(held_out: int, size: int = 32) -> AnomalySet:
    """Semantic novelty on digits: one class never seen in training is the anomaly.

    Train: the first 1,500 digits whose class is not `held_out`; test: the other 297 digits, label 1 where the
    class is `held_out`. Images [0, 1], bilinearly upsampled to size x size.

    Args:
        held_out: the novel class, 0..9.
        size: image side in pixels.

    Returns:
        An AnomalySet named f"digits_novelty_{held_out}": train [N, 1, size, size] (N about 1,350), test
        [297, 1, size, size], masks None, categories [f"held_out_{held_out}"] * 297, defect_types "good" or
        f"digit_{held_out}".

    Raises:
        ValueError: held_out outside 0..9.
    """
    if isinstance(held_out, bool) or not isinstance(held_out, int) or not 0 <= held_out <= 9:
        raise ValueError(f"held_out must be a digit class 0..9, got {held_out!r}")
    train, test, train_classes, test_classes = _digits_split(size)
    keep = train_classes != held_out
    labels = (test_classes == held_out).long()
    category = f"held_out_{held_out}"
    defect_types = [f"digit_{held_out}" if label else "good" for label in labels.tolist()]
    return AnomalySet(f"digits_novelty_{held_out}", train[keep], test, labels, None, [category] * len(test),
                      [category] * int(keep.sum()), defect_types)
