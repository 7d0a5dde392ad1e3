"""Image data: sklearn digits (real 8x8 images that ship offline), torchvision CIFAR-10, and any image folder.

Every source holds its images as one float tensor in [-1, 1], N x C x H x W, and `sample(n, generator)` draws a
batch with replacement from an explicit generator (so resumed runs draw the same batches). `hflip` flips half of
each batch horizontally (the paper's augmentation for CIFAR-10). Sources with class labels (digits, CIFAR-10) also
give `sample_conditioned(n, generator) -> (images, Conditions)`, the batch with its labels, for conditional runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from rewardtune.conditions import Conditions
from rewardtune.errors import RewardtuneError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class TensorImages:
    """Images held in memory as a [N, C, H, W] tensor in [-1, 1], optionally with class labels [N] (int64)."""

    def __init__(
        self,
        images: torch.Tensor,
        *,
        hflip: bool = False,
        name: str = "images",
        labels: torch.Tensor | None = None,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        if images.dim() != 4:
            raise ValueError(f"{name}: expected N x C x H x W images, got shape {tuple(images.shape)}")
        if labels is not None and tuple(labels.shape) != (images.shape[0],):
            raise ValueError(f"{name}: {tuple(labels.shape)} labels for {images.shape[0]} images")
        self.images = images.float().contiguous()
        self.labels = None if labels is None else labels.long().contiguous()
        self.class_names = class_names
        self.hflip = hflip
        self.name = name

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        return self.sample_rows(n, generator, device)[0]

    def sample_rows(self, n: int, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        """n images drawn with replacement (flipped when `hflip`) and their row numbers [n]."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        batch = self.images[idx]
        if self.hflip:
            flip = torch.rand(n, generator=generator) < 0.5
            batch[flip] = batch[flip].flip(-1)
        return batch.to(device), idx

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else int(self.labels.max()) + 1

    def sample_conditioned(
        self, n: int, generator: torch.Generator | None = None, device="cpu"
    ) -> tuple[torch.Tensor, Conditions]:
        """n images and their class labels, drawn as `sample` draws them."""
        if self.labels is None:
            raise RewardtuneError(f"{self.name} has no class labels to condition on")
        images, idx = self.sample_rows(n, generator, device)
        return images, Conditions(labels=self.labels[idx].to(device))


def load_digits_images() -> torch.Tensor:
    """sklearn's 1,797 handwritten digits as [N, 1, 8, 8] in [-1, 1] (pixel values 0..16)."""
    from sklearn.datasets import load_digits

    pixels = torch.from_numpy(load_digits().images).float()  # [N, 8, 8], 0..16
    return (pixels / 16.0 * 2 - 1).unsqueeze(1)


def build_digits(
    *, hflip: bool = False, digit: int | None = None, split: Literal["all", "train", "test"] = "all"
) -> TensorImages:
    """Data `digits`: sklearn's 8x8 digits (optionally one class only). `split`: "all" 1,797 images, "train" the
    first 1,500, "test" the other 297 (the digits classifier's split, `nets/digits.py: TRAIN_COUNT`).

    Raises:
        ValueError: a digit outside 0..9, an unknown split.
    """
    from sklearn.datasets import load_digits

    from rewardtune.nets.digits import TRAIN_COUNT

    images = load_digits_images()
    labels = torch.from_numpy(load_digits().target).long()
    parts = {"all": slice(None), "train": slice(None, TRAIN_COUNT), "test": slice(TRAIN_COUNT, None)}
    if split not in parts:
        raise ValueError(f"unknown digits split {split!r}: expected \"all\", \"train\" or \"test\"")
    images, labels = images[parts[split]], labels[parts[split]]
    if digit is not None:
        if not 0 <= digit <= 9:
            raise ValueError(f"digit must be in 0..9, got {digit}")
        images, labels = images[labels == digit], labels[labels == digit]
    return TensorImages(images, hflip=hflip, name="digits", labels=labels, class_names=tuple(str(k) for k in range(10)))


def build_cifar10(*, root: str = "data/cifar10", download: bool = True, hflip: bool = True) -> TensorImages:
    """Data `cifar10`: the CIFAR-10 training set through torchvision (downloaded into `root` when allowed)."""
    from torchvision.datasets import CIFAR10

    try:
        dataset = CIFAR10(root=root, train=True, download=download)
    except Exception as err:  # noqa: BLE001 (URLError, RuntimeError("Dataset not found ...") and friends)
        raise RewardtuneError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({type(err).__name__}); "
            "put cifar-10-batches-py there or set data.root"
        ) from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).float()  # [N, 3, 32, 32], 0..255
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    return TensorImages(images / 127.5 - 1, hflip=hflip, name="cifar10", labels=labels, class_names=tuple(dataset.classes))


def build_image_folder(
    *, path: str, size: int = 32, channels: int = 3, hflip: bool = False, labels_from_folders: bool = False
) -> TensorImages:
    """Data `image_folder`: every image under `path`, resized to size x size. With `labels_from_folders`, an image's
    class is the first-level subfolder it lies in (ImageNet's layout: one folder per class, classes in sorted
    order), for class-conditional runs."""
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RewardtuneError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for f in files:
        try:
            with Image.open(f) as img:
                img = img.convert(mode).resize((size, size), Image.BICUBIC)
        except OSError as err:  # PIL's UnidentifiedImageError for a corrupt or mislabelled file, and read errors
            raise RewardtuneError(f"cannot read image {f}: {err}") from None
        arrays.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, channels))
    images = torch.stack(arrays).permute(0, 3, 1, 2).float()
    if not labels_from_folders:
        return TensorImages(images / 127.5 - 1, hflip=hflip, name=f"image_folder {path}")
    root = Path(path)
    folders = [f.relative_to(root).parts[0] if len(f.relative_to(root).parts) > 1 else "" for f in files]
    if "" in folders:
        loose = files[folders.index("")]
        raise RewardtuneError(f"labels_from_folders: {loose} is not in a class subfolder of {path}")
    names = tuple(sorted(set(folders)))
    labels = torch.tensor([names.index(f) for f in folders], dtype=torch.long)
    return TensorImages(images / 127.5 - 1, hflip=hflip, name=f"image_folder {path}", labels=labels, class_names=names)
