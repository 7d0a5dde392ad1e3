"""Writing samples to disk: arrays (.npz / .npy), an image grid (.png), or a folder of PNGs; and which conditions
a conditional run is sampled under.

A grid is for looking at: by default `GRID_SAMPLES` images, each enlarged (nearest neighbour, so pixels stay
sharp) to at least `GRID_MIN_PIXELS` on its longer side, in a near-square layout. Arrays and folders hold what
they are asked for (`ARRAY_SAMPLES` by default).

Conditional runs are sampled per condition (`requested_conditions`: the class labels or prompts asked for, else
every training condition), `-n` samples each (`GRID_SAMPLES_PER_CONDITION` / `ARRAY_SAMPLES_PER_CONDITION` by
default). `write_conditional_samples` writes one grid per condition (`<stem>_<i>_<slug>.png` when there are
several), one subfolder per condition, or one .npz holding every sample and its condition (`labels` or `prompts`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rewardtune.conditions import Conditions
from rewardtune.errors import RewardtuneError

GRID_SAMPLES = 64  # images in a .png grid unless `rewardtune sample -n` says otherwise (8 x 8)
GRID_MIN_PIXELS = 64  # each image of a grid is enlarged by an integer factor to at least this many pixels
ARRAY_SAMPLES = 1000  # samples in an array or a folder unless -n says otherwise
GRID_SAMPLES_PER_CONDITION = 16  # a conditional run's grids: 4 x 4 images per condition
ARRAY_SAMPLES_PER_CONDITION = 100  # a conditional run's arrays and folders: per condition (runs may have many)
SLUG_CHARS = 40  # the longest condition slug in a file or folder name


def default_sample_count(output: Path, conditional: bool = False) -> int:
    """How many samples `rewardtune sample -o output` draws without -n: a readable grid, or a batch for metrics;
    for a conditional run, how many per condition."""
    grid = Path(output).suffix.lower() == ".png"
    if conditional:
        return GRID_SAMPLES_PER_CONDITION if grid else ARRAY_SAMPLES_PER_CONDITION
    return GRID_SAMPLES if grid else ARRAY_SAMPLES


def image_grid(images: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] in [0, 1] -> one grid image [C, H', W'] in [0, 1]: ceil(sqrt(N)) per row, each image
    enlarged by the integer factor that makes its longer side at least GRID_MIN_PIXELS, 2 white pixels between."""
    from torchvision.utils import make_grid

    scale = max(1, math.ceil(GRID_MIN_PIXELS / max(images.shape[-2:])))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    return make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2, pad_value=1.0)


def write_samples(samples: torch.Tensor, output: Path) -> Path:
    """Write `samples` ([N, D] vectors or [N, C, H, W] images in [-1, 1]) as `output` says; returns the path."""
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix in (".npz", ".npy"):
        output.parent.mkdir(parents=True, exist_ok=True)
        array = samples.numpy()
        np.savez(output, samples=array) if suffix == ".npz" else np.save(output, array)
        return output
    if samples.dim() != 4:
        raise RewardtuneError(f"{output}: vectors are written as .npz or .npy")
    from torchvision.utils import save_image

    images = (samples.clamp(-1, 1) + 1) / 2
    if suffix == ".png":
        output.parent.mkdir(parents=True, exist_ok=True)
        save_image(image_grid(images), str(output))
        return output
    if suffix:
        raise RewardtuneError(f"output {output} must be .npz, .npy, .png or a folder")
    output.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, str(output / f"{i:06d}.png"))
    return output


# ---- conditional sampling ----------------------------------------------------------------------------------------
def read_prompt_lines(path: Path, where: str = "") -> list[str]:
    """The prompts of a text file, one per line (stripped; UTF-8, a byte-order mark skipped), read as a recipe's
    prompt files are (`condition_sources.read_lines`). `where` ("--prompts: ") prefixes errors.

    Raises:
        RecipeError: a missing, unreadable or empty file, or an empty line (naming it).
    """
    from rewardtune.condition_sources import read_lines

    return [line.strip() for line in read_lines(Path(path), f"{where}{path}")]


def requested_conditions(
    supply, labels: Sequence[int] | None, prompts: Sequence[str] | None, run: str = "this run"
) -> Conditions | None:
    """The conditions to sample, one row each: the class labels or prompts asked for (repeats kept once, in order),
    every training condition of the run when neither is given, None for an unconditional run.

    Args:
        supply: the run's `ConditionSupply` (`Trainer.conditions`), None for an unconditional run.
        labels: class labels in 0..K-1, for a label-conditioned run.
        prompts: prompts, for a prompt-conditioned run; prompts it was not trained on are allowed (the text encoder
            embeds them).
        run: the run's name in messages.
    Raises:
        RewardtuneError: conditions for an unconditional run, labels for a prompt run (or prompts for a label run),
            a label out of range, an empty prompt.
    """
    if labels is not None and prompts is not None:
        raise RewardtuneError("give class labels (--label) or prompts (--prompt, --prompts), not both")
    if supply is None:
        if labels is not None or prompts is not None:
            asked = "class labels (--label)" if labels is not None else "prompts (--prompt, --prompts)"
            raise RewardtuneError(f"{run} is an unconditional run: it takes no {asked}")
        return None
    num_classes = getattr(supply.source, "num_classes", None)
    if labels is None and prompts is None:
        return supply.source.split("train")  # every training condition once
    if num_classes is not None and prompts is not None:
        raise RewardtuneError(
            f"{run} is conditioned on class labels 0..{num_classes - 1}: sample it with --label K, not with prompts"
        )
    if num_classes is None and labels is not None:
        raise RewardtuneError(
            f"{run} is conditioned on prompts: sample it with --prompt TEXT or --prompts FILE, not with class labels"
        )
    if labels is not None:
        return Conditions.from_labels(checked_labels(labels, num_classes, run))
    return Conditions.from_prompts(checked_prompts(prompts))


def checked_labels(labels: Sequence[int], num_classes: int, run: str) -> list[int]:
    """`labels` as ints, repeats kept once; RewardtuneError for none, or one outside 0..num_classes-1."""
    if isinstance(labels, torch.Tensor):
        labels = labels.view(-1).tolist()
    if len(labels) == 0:
        raise RewardtuneError("no class label given (pass None to sample every class)")
    unique = []
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise TypeError(f"class labels are ints, got {label!r} ({type(label).__name__})")
        if not 0 <= label < num_classes:
            raise RewardtuneError(
                f"label {label} is out of range: {run} has {num_classes} classes (0..{num_classes - 1})"
            )
        if int(label) not in unique:
            unique.append(int(label))
    return unique


def checked_prompts(prompts: Sequence[str]) -> list[str]:
    """`prompts` stripped, repeats kept once; RewardtuneError for none or an empty one."""
    if isinstance(prompts, str):
        raise TypeError("prompts is a list of strings, got one string")
    if len(prompts) == 0:
        raise RewardtuneError("no prompt given (pass None to sample every training prompt)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts are strings, got {prompt!r} ({type(prompt).__name__})")
        if not prompt.strip():
            raise RewardtuneError(f"prompt {i + 1} of the {len(prompts)} given is empty")
    return list(dict.fromkeys(p.strip() for p in prompts))


def condition_slug(key: str) -> str:
    """A file-name-safe form of a condition's name: lowercase ASCII letters, digits and underscores, at most
    SLUG_CHARS characters ("class 3" -> "class_3", "A red circle!" -> "a_red_circle")."""
    slug = re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")
    return slug[:SLUG_CHARS].rstrip("_") or "condition"


def condition_groups(condition: Conditions) -> list[tuple[str, list[int]]]:
    """(name, row numbers) of each distinct condition of `condition`, in the order of first appearance."""
    groups: dict[str, list[int]] = {}
    for row, key in enumerate(condition.keys()):
        groups.setdefault(key, []).append(row)
    return list(groups.items())


def write_conditional_samples(
    samples: torch.Tensor, condition: Conditions, output: Path
) -> list[tuple[Path, str, int]]:
    """Write `samples` [N, ...] drawn under `condition` (N rows) as `output` says, per condition.

    - .npz: one file, `samples` and each sample's condition: `labels` (int64 [N]) or `prompts` (str [N]);
    - .npy: only for one condition (the array cannot hold conditions);
    - .png: one grid per condition: `output` itself for one condition, else `<stem>_<i>_<slug>.png`;
    - a folder: one subfolder `<i>_<slug>` of PNGs per condition.

    Returns:
        (path written, what it holds: a condition's name or "k conditions", number of samples) per file or folder.
    """
    output = Path(output)
    suffix = output.suffix.lower()
    groups = condition_groups(condition)
    if len(condition) != samples.shape[0]:
        raise ValueError(f"{len(condition)} conditions for {samples.shape[0]} samples")
    if suffix == ".npz":
        output.parent.mkdir(parents=True, exist_ok=True)
        if condition.prompts is not None:
            np.savez(output, samples=samples.numpy(), prompts=np.array(condition.prompts, dtype=str))
        else:
            np.savez(output, samples=samples.numpy(), labels=condition.labels.cpu().numpy())
        return [(output, f"{len(groups)} condition{'s' if len(groups) > 1 else ''}", samples.shape[0])]
    if suffix == ".npy" and len(groups) > 1:
        raise RewardtuneError(
            f"{output}: a .npy array cannot say which of the {len(groups)} conditions each sample has; write a .npz "
            "(it stores them) or a folder"
        )
    written = []
    for i, (key, rows) in enumerate(groups):
        if suffix in (".png", ".npy"):
            path = output if len(groups) == 1 else output.with_name(f"{output.stem}_{i}_{condition_slug(key)}{suffix}")
        elif suffix:
            raise RewardtuneError(f"output {output} must be .npz, .npy, .png or a folder")
        else:
            path = output / f"{i}_{condition_slug(key)}"
        written.append((write_samples(samples[rows], path), key, len(rows)))
    return written
