"""Scoring images with a trained anomaly energy (DxMI, Yoon et al. 2024, §5.3; MVTec-AD as in UniAD).

A model maps each image to an energy map [h, w] over its feature grid (higher: more anomalous). The image score is
the largest energy of the map (max pooling); the localisation map is the energy map upsampled bilinearly to the
image size. Both are ranked against ground truth with the ROC AUC: image AUROC over image labels, pixel AUROC over
every pixel of the defect masks.

`score_folder` runs the whole thing on a folder: MVTec's test layout (`good/` plus one subfolder per defect type)
gives labels, MVTec's `ground_truth/` layout (`<defect>/<stem>_mask.png`) gives masks. It writes `scores.csv`, one
heat-map overlay per image under `overlays/`, and `auroc.json`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from rewardtune.errors import RecipeError, RewardtuneError

IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "TIFF")  # PIL's names; MPO is what some cameras' JPEGs open as
NORMAL_FOLDER = "good"  # MVTec's folder of defect-free test images


class AnomalyModel(Protocol):
    """What scoring needs from a trained detector (`rewardtune.anomaly.model.load_anomaly_model` returns one)."""

    image_channels: int  # channels the extractor takes (1 or 3)
    image_size: int | None  # images are resized to image_size x image_size before extraction (None: as given)

    def energy_map(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] in [0, 1] (on the CPU) -> energies [N, h, w], higher meaning more anomalous."""
        ...


def load_model_for(run_dir: Path, best: bool = False) -> AnomalyModel:
    """The trained anomaly model of a run directory (its best checkpoint with `best`). The CLI gets its model only
    through this function, so tests replace it with a fake."""
    from rewardtune.anomaly.model import load_anomaly_model

    return load_anomaly_model(run_dir, best=best)


# Scores and maps


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Energy maps [N, h, w] -> image scores [N]: the largest energy of each map. ValueError unless 3-D."""
    if maps.dim() != 3:
        raise ValueError(f"energy maps must be [N, h, w], got shape {tuple(maps.shape)}")
    return maps.amax(dim=(1, 2))


def localisation_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Energy maps [N, h, w] -> [N, H, W] at size = (H, W): bilinear upsampling with align_corners=False (each
    energy sits at its cell's centre; beyond the outer centres the edge value is held). ValueError unless 3-D."""
    if maps.dim() != 3:
        raise ValueError(f"energy maps must be [N, h, w], got shape {tuple(maps.shape)}")
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def score_images(model: AnomalyModel, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [N] and localisation maps [N, H, W] (float32, CPU) of images [N, C, H, W] in [0, 1], `batch_size` at a
    time under inference mode. ValueError for an empty set or a model whose maps are not [n, h, w];
    RewardtuneError when the model gives NaN or infinite energies."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W], got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    size = (images.shape[-2], images.shape[-1])
    scores, maps = [], []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size]  # [n, C, H, W]
            energy = model.energy_map(batch)
            if energy.dim() != 3 or energy.shape[0] != batch.shape[0]:
                raise ValueError(f"energy_map of {batch.shape[0]} images must be [{batch.shape[0]}, h, w], "
                                 f"got shape {tuple(energy.shape)}")
            energy = energy.float().cpu()  # [n, h, w]
            if not torch.isfinite(energy).all():
                bad = start + int((~torch.isfinite(energy)).flatten(1).any(1).nonzero()[0])
                raise RewardtuneError(f"the model gave non-finite energies for image {bad} (0-based)")
            scores.append(image_scores(energy))
            maps.append(localisation_maps(energy, size))
    return torch.cat(scores), torch.cat(maps)


# AUROC


def as_numpy(x) -> np.ndarray:
    """A tensor (any device) or array-like as a NumPy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def two_class_auroc(scores: np.ndarray, labels: np.ndarray, what: str) -> float:
    """ROC AUC of 1-D scores against 0/1 labels; ValueError when the labels hold one class only."""
    from sklearn.metrics import roc_auc_score

    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), got {sorted(set(labels.tolist()))[:5]}")
    anomalous = int(labels.sum())
    if anomalous in (0, labels.size):
        kind = "anomalous" if anomalous else "normal"
        raise ValueError(f"AUROC needs both normal and anomalous {what}: all {labels.size} are {kind}")
    return float(roc_auc_score(labels, scores))


def image_auroc(scores, labels) -> float:
    """Image AUROC of scores [N] (higher: more anomalous) against labels [N] (0 normal, 1 anomalous), in [0, 1]
    (ties count one half). ValueError for mismatched shapes or a set with one class only."""
    scores, labels = as_numpy(scores).astype(np.float64), as_numpy(labels).astype(np.int64)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must both be [N], got {scores.shape} and {labels.shape}")
    return two_class_auroc(scores, labels, "images")


def pixel_auroc(maps, masks) -> float:
    """Pixel AUROC of localisation maps [N, H, W] against defect masks [N, H, W] (bool, True on defect pixels),
    every pixel of every image pooled. ValueError for mismatched shapes or when no (or every) pixel is a defect."""
    maps, masks = as_numpy(maps), as_numpy(masks)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps and masks must both be [N, H, W], got {maps.shape} and {masks.shape}")
    return two_class_auroc(maps.reshape(-1).astype(np.float64), masks.reshape(-1).astype(np.int64), "pixels")


def per_category_auroc(scores, labels, categories: Sequence[str], maps=None, masks=None) -> dict[str, dict[str, float]]:
    """Image (and pixel) AUROC per category, as MVTec-AD reports them.

    Args:
        scores, labels: [N] image scores and 0/1 labels.
        categories: N category names (one per image).
        maps, masks: optional [N, H, W] localisation maps and bool defect masks, both or neither.

    Returns:
        {category: {"image_auroc": a, "pixel_auroc": p}, ..., "mean": {...}} in first-seen order; "pixel_auroc" only
        where masks are given and the category has defect pixels, and its mean over those categories.

    Raises:
        ValueError: mismatched lengths, maps without masks, a category named "mean", or a category holding one
            class only (named).
    """
    categories = list(categories)
    if len(categories) != len(scores) or len(labels) != len(scores):
        raise ValueError(f"scores, labels and categories differ in length: {len(scores)}, {len(labels)}, {len(categories)}")
    if (maps is None) != (masks is None):
        raise ValueError("give both maps and masks for pixel AUROC, or neither")
    if "mean" in categories:
        raise ValueError('"mean" cannot be a category name: it holds the means')
    scores, labels = as_numpy(scores), as_numpy(labels)
    maps, masks = (None, None) if masks is None else (as_numpy(maps), as_numpy(masks).astype(bool))
    names = np.asarray(categories, dtype=object)
    result: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(categories):
        index = np.flatnonzero(names == name)
        try:
            entry = {"image_auroc": image_auroc(scores[index], labels[index])}
        except ValueError as err:
            raise ValueError(f"category {name!r}: {err}") from None
        if masks is not None and masks[index].any():
            entry["pixel_auroc"] = pixel_auroc(maps[index], masks[index])
        result[name] = entry
    result["mean"] = {
        key: float(np.mean(values))
        for key in ("image_auroc", "pixel_auroc")
        if (values := [entry[key] for entry in result.values() if key in entry])
    }
    return result


# Reading folders


@dataclass(frozen=True)
class ImageFolderScan:
    """The images of a folder, in sorted order of their paths."""

    root: Path  # the folder read
    paths: list[PurePosixPath]  # each image's path relative to root
    images: torch.Tensor  # [N, C, H, W] float32 in [0, 1]
    labels: torch.Tensor | None  # [N] int64: 0 under good/, 1 elsewhere (MVTec test layout); None for a flat folder
    defect_types: list[str] | None  # each image's first-level folder ("good" for normal ones); None for a flat folder


def check_folder(path: Path, what: str) -> None:
    """RecipeError unless `path` is an existing folder."""
    if not path.exists():
        raise RecipeError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise RecipeError(f"{what} {path} is not a folder")


def visible_files(root: Path) -> list[PurePosixPath]:
    """Every file under root (recursively) whose path has no hidden part (.DS_Store, .ipynb_checkpoints/...),
    relative to root, sorted."""
    files = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
    return sorted(PurePosixPath(p.as_posix()) for p in files if not any(part.startswith(".") for part in p.parts))


def read_image(path: Path, channels: int, image_size: int | None) -> torch.Tensor:
    """One image file -> [channels, H, W] float32 in [0, 1] (resized bilinearly to image_size² when given).
    RecipeError naming the file when it is not a PNG, JPEG, BMP or TIFF image, or cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.format not in IMAGE_FORMATS:
                raise RecipeError(f"{path} is a {img.format} image; expected PNG, JPEG, BMP or TIFF")
            img = img.convert("L" if channels == 1 else "RGB")
    except UnidentifiedImageError:
        raise RecipeError(f"{path} is not an image (PNG, JPEG, BMP or TIFF); move it out of the folder") from None
    except (OSError, SyntaxError, ValueError) as err:  # a truncated or corrupt file, an unreadable one
        raise RecipeError(f"cannot read image {path}: {getattr(err, 'strerror', None) or err}") from None
    if image_size is not None:
        img = img.resize((image_size, image_size), Image.BILINEAR)
    array = np.array(img, dtype=np.uint8).reshape(img.height, img.width, channels)  # [H, W, C]
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def folder_labels(root: Path, paths: list[PurePosixPath]) -> tuple[torch.Tensor | None, list[str] | None]:
    """(labels [N], defect types) from MVTec's test layout, where a good/ subfolder holds the normal images and
    every other subfolder one defect type; (None, None) without a good/ subfolder. RecipeError for a file directly
    in root next to a good/ subfolder (its label would be unknown)."""
    if not any(len(p.parts) > 1 and p.parts[0] == NORMAL_FOLDER for p in paths):
        return None, None
    loose = next((p for p in paths if len(p.parts) == 1), None)
    if loose is not None:
        raise RecipeError(f"{root / loose} lies next to {root / NORMAL_FOLDER}/: move it into good/ or a defect folder")
    defect_types = [p.parts[0] for p in paths]
    return torch.tensor([int(d != NORMAL_FOLDER) for d in defect_types]), defect_types


def check_same_size(root: Path, paths: list[PurePosixPath], images: list[torch.Tensor]) -> None:
    """RecipeError naming two files of different sizes (W x H), if any."""
    first = images[0].shape[-2:]
    other = next((i for i, image in enumerate(images) if image.shape[-2:] != first), None)
    if other is not None:
        (h0, w0), (h1, w1) = first, images[other].shape[-2:]
        raise RecipeError(
            f"images of different sizes: {root / paths[0]} is {w0}x{h0}, {root / paths[other]} is {w1}x{h1}; "
            "this model scores images as given, so give it images of one size"
        )


def read_folder(input_dir: Path, channels: int, *, image_size: int | None = None) -> ImageFolderScan:
    """Every image under input_dir (PNG, JPEG, BMP or TIFF, recursively, hidden files skipped) as an ImageFolderScan.

    Images are converted to `channels` (1: grey, 3: RGB). With `image_size`, each is resized bilinearly to
    image_size x image_size, whatever its own size; with None, all must share one size. Labels come from MVTec's
    test layout (`folder_labels`).

    Raises:
        RecipeError: the folder is missing; it holds no image; a visible file is not an image; images differ in
            size (image_size None); a file lies loose next to good/. Each message names the path.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    root = Path(input_dir)
    check_folder(root, "input folder")
    paths = visible_files(root)
    if not paths:
        raise RecipeError(f"no images (PNG, JPEG, BMP or TIFF) in {root}")
    labels, defect_types = folder_labels(root, paths)
    images = [read_image(root / p, channels, image_size) for p in paths]
    if image_size is None:
        check_same_size(root, paths, images)
    return ImageFolderScan(root, paths, torch.stack(images), labels, defect_types)


def mask_file(masks_dir: Path, path: PurePosixPath) -> Path | None:
    """The mask of the image at relative `path` (`<defect>/<stem>.png`): `<defect>/<stem>_mask.png` as in MVTec,
    else `<defect>/<stem>.png`; None when neither exists."""
    folder = masks_dir.joinpath(*path.parent.parts)
    return next((f for f in (folder / f"{path.stem}_mask.png", folder / f"{path.stem}.png") if f.is_file()), None)


def read_masks(masks_dir: Path, scan: ImageFolderScan) -> torch.Tensor:
    """Defect masks [N, H, W] bool for the images of `scan`, from MVTec's ground_truth layout (`mask_file`): each
    resized (nearest) to the images' size and binarised at > 127; normal (good/) images get all-False masks.

    Raises:
        RecipeError: masks_dir is missing; the scan has no labels (a flat folder); an anomalous image has no mask,
            or its mask cannot be read. Each message names the path.
    """
    from PIL import Image

    masks_dir = Path(masks_dir)
    check_folder(masks_dir, "masks folder")
    if scan.labels is None:
        raise RecipeError(f"masks need labels, but {scan.root} has no good/ subfolder (MVTec test layout: good/ plus "
                          "one folder per defect type)")
    height, width = scan.images.shape[-2:]
    masks = torch.zeros(len(scan.paths), height, width, dtype=torch.bool)  # [N, H, W]
    for i, path in enumerate(scan.paths):
        if scan.labels[i] == 0:
            continue
        file = mask_file(masks_dir, path)
        if file is None:
            expected = masks_dir.joinpath(*path.parent.parts, f"{path.stem}_mask.png")
            raise RecipeError(f"no mask for the anomalous image {scan.root / path}: expected {expected}")
        try:
            with Image.open(file) as img:
                img = img.convert("L").resize((width, height), Image.NEAREST)
        except (OSError, SyntaxError, ValueError) as err:
            raise RecipeError(f"cannot read mask {file}: {getattr(err, 'strerror', None) or err}") from None
        masks[i] = torch.from_numpy(np.array(img, dtype=np.uint8) > 127)
    return masks


# Writing results


def overlay_name(path: PurePosixPath) -> str:
    """The overlay file name of an image at relative `path`: `/` becomes `__`, and `.png` is appended unless the
    image is a PNG already (`crack/000.png` -> `crack__000.png`, `a/1.jpg` -> `a__1.jpg.png`)."""
    name = path.as_posix().replace("/", "__")
    return name if name.lower().endswith(".png") else f"{name}.png"


def write_overlays(
    images: torch.Tensor, maps: torch.Tensor, paths: Sequence[PurePosixPath], out_dir: Path,
    colormap: str = "jet", alpha: float = 0.5, *, value_range: tuple[float, float] | None = None,
) -> list[Path]:
    """One PNG per image: the image (grey or RGB) blended with its localisation map drawn in a matplotlib colormap,
    (1 - alpha) * image + alpha * heat, named by `overlay_name`.

    Args:
        images: [N, C, H, W] in [0, 1], C 1 or 3.
        maps: [N, H, W] localisation maps.
        paths: N relative image paths (they name the files).
        out_dir: the folder to write to (created).
        colormap: a name in `matplotlib.colormaps`.
        alpha: opacity of the heat map, in [0, 1].
        value_range: the energies drawn as the colormap's two ends (default: the min and max over all maps, so that
            colours compare across images).

    Returns:
        The files written. ValueError for mismatched shapes, an unknown colormap or alpha outside [0, 1];
        RecipeError when two paths give one file name (`a/b__c.png` and `a__b/c.png`).
    """
    from matplotlib import colormaps
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3) or maps.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"images [N, 1|3, H, W] and maps [N, H, W] expected, got {tuple(images.shape)} and {tuple(maps.shape)}")
    if len(paths) != images.shape[0]:
        raise ValueError(f"{len(paths)} paths for {images.shape[0]} images")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if colormap not in colormaps:
        raise ValueError(f"unknown matplotlib colormap {colormap!r}")
    names = [overlay_name(PurePosixPath(p)) for p in paths]
    if len(set(names)) != len(names):
        raise RecipeError(f"two images give one overlay name: {min(n for n in names if names.count(n) > 1)}; rename one")
    low, high = value_range if value_range is not None else (float(maps.min()), float(maps.max()))
    heat = ((maps.float() - low) / max(high - low, 1e-12)).clamp(0, 1)  # [N, H, W]
    cmap = colormaps[colormap]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image, level, name in zip(images.float(), heat, names, strict=True):
        colour = torch.from_numpy(cmap(level.numpy())[..., :3]).permute(2, 0, 1).float()  # [3, H, W]
        blend = (1 - alpha) * image.expand(3, -1, -1) + alpha * colour  # [3, H, W]
        pixels = (blend * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, 3]
        Image.fromarray(pixels).save(out_dir / name)
        written.append(out_dir / name)
    return written


def write_scores_csv(file: Path, scan: ImageFolderScan, scores: torch.Tensor) -> None:
    """scores.csv: path (relative to the folder), score, and label and defect_type when the layout gives them."""
    with file.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "score"] + (["label", "defect_type"] if scan.labels is not None else []))
        for i, path in enumerate(scan.paths):
            known = [int(scan.labels[i]), scan.defect_types[i]] if scan.labels is not None else []
            writer.writerow([path.as_posix(), f"{float(scores[i]):.8g}", *known])


def check_paths(input_dir: Path, out_dir: Path, masks_dir: Path | None = None) -> None:
    """The checks that need no images (run before a model is loaded): the input and mask folders exist, and the
    output folder is not a file nor inside the input folder (its overlays would be read as images next time)."""
    check_folder(Path(input_dir), "input folder")
    if masks_dir is not None:
        check_folder(Path(masks_dir), "masks folder")
    if Path(out_dir).is_file():
        raise RecipeError(f"output folder {out_dir} is a file")
    if Path(out_dir).resolve().is_relative_to(Path(input_dir).resolve()):
        raise RecipeError(f"output folder {out_dir} lies inside the input folder {input_dir}; write it elsewhere")


def folder_aurocs(labels: torch.Tensor, scores: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor | None) -> dict:
    """{"image_auroc", "pixel_auroc" (with masks), "notes"}: an AUROC that one class only makes undefined is left
    out, and a note says why (the scores and overlays are still worth writing)."""
    result: dict = {}
    notes = []
    try:
        result["image_auroc"] = image_auroc(scores, labels)
    except ValueError as err:
        notes.append(f"no image AUROC: {err}")
    if masks is not None:
        try:
            result["pixel_auroc"] = pixel_auroc(maps, masks)
        except ValueError as err:
            notes.append(f"no pixel AUROC: {err}")
    return result | {"notes": notes}


def score_folder(model: AnomalyModel, input_dir: Path, out_dir: Path, masks_dir: Path | None = None) -> dict:
    """Score every image of input_dir and write, into out_dir (created): scores.csv (`write_scores_csv`),
    overlays/*.png (`write_overlays`), and, when the folder is in MVTec test layout, auroc.json.

    Returns:
        {"images": N, "anomalous": k (labelled folders), "image_auroc", "pixel_auroc" (with masks_dir), "notes":
        [why an AUROC is missing], "files": {"scores", "overlays", "auroc"}: paths as strings}; auroc.json holds it
        without "files".

    Raises:
        RecipeError: see `check_paths`, `read_folder` and `read_masks` (masks for a flat folder, a missing mask).
        OSError: out_dir cannot be written.
    """
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    check_paths(input_dir, out_dir, masks_dir)
    scan = read_folder(input_dir, model.image_channels, image_size=model.image_size)
    masks = read_masks(Path(masks_dir), scan) if masks_dir is not None else None
    scores, maps = score_images(model, scan.images)
    summary: dict = {"images": len(scan.paths)}
    if scan.labels is None:
        summary["notes"] = [f"no AUROC: {input_dir} has no good/ subfolder, so its images have no labels"]
    else:
        summary |= {"anomalous": int(scan.labels.sum())} | folder_aurocs(scan.labels, scores, maps, masks)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_scores_csv(out_dir / "scores.csv", scan, scores)
    write_overlays(scan.images, maps, scan.paths, out_dir / "overlays")
    files = {"scores": str(out_dir / "scores.csv"), "overlays": str(out_dir / "overlays")}
    if scan.labels is not None:
        (out_dir / "auroc.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        files["auroc"] = str(out_dir / "auroc.json")
    return summary | {"files": files}

