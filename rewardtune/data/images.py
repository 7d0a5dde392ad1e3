"""Image data: sklearn digits (real 8x8 images that ship offline), torchvision CIFAR-10, and any image folder.

Every source holds its images as one float tensor in [-1, 1], N x C x H x W, and `sample(n, generator)` draws a
batch with replacement from an explicit generator (so resumed runs draw the same batches). `hflip` flips half of
each batch horizontally (the paper's augmentation for CIFAR-10).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rewardtune.errors import RewardtuneError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class TensorImages:
    """Images held in memory as a [N, C, H, W] tensor in [-1, 1]."""

    def __init__(self, images: torch.Tensor, *, hflip: bool = False, name: str = "images") -> None:
        if images.dim() != 4:
            raise ValueError(f"{name}: expected N x C x H x W images, got shape {tuple(images.shape)}")
        self.images = images.float().contiguous()
        self.hflip = hflip
        self.name = name

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        idx = torch.randint(0, len(self), (n,), generator=generator)
        batch = self.images[idx]
        if self.hflip:
            flip = torch.rand(n, generator=generator) < 0.5
            batch[flip] = batch[flip].flip(-1)
        return batch.to(device)


def load_digits_images() -> torch.Tensor:
    """sklearn's 1,797 handwritten digits as [N, 1, 8, 8] in [-1, 1] (pixel values 0..16)."""
    from sklearn.datasets import load_digits

    pixels = torch.from_numpy(load_digits().images).float()  # [N, 8, 8], 0..16
    return (pixels / 16.0 * 2 - 1).unsqueeze(1)


def build_digits(*, hflip: bool = False, digit: int | None = None) -> TensorImages:
    """Data `digits`: sklearn's 8x8 digits (optionally one class only)."""
    images = load_digits_images()
    if digit is not None:
        from sklearn.datasets import load_digits

        if not 0 <= digit <= 9:
            raise ValueError(f"digit must be in 0..9, got {digit}")
        images = images[torch.from_numpy(load_digits().target) == digit]
    return TensorImages(images, hflip=hflip, name="digits")


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
    return TensorImages(images / 127.5 - 1, hflip=hflip, name="cifar10")


def build_image_folder(*, path: str, size: int = 32, channels: int = 3, hflip: bool = False) -> TensorImages:
    """Data `image_folder`: every image under `path`, resized to size x size."""
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
    return TensorImages(images / 127.5 - 1, hflip=hflip, name=f"image_folder {path}")
