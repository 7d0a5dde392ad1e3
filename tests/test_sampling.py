"""`rewardtune sample`: a .png is a readable grid (64 images, each enlarged to at least 64 px, unless -n says
otherwise); arrays and folders hold -n samples (1,000 by default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import cli

from rewardtune.sampling import default_sample_count, write_samples

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("n", "side", "scale", "columns", "rows"),
    [(64, 8, 8, 8, 8), (10, 8, 8, 4, 3), (16, 32, 2, 4, 4), (4, 64, 1, 2, 2), (9, 48, 2, 3, 3)],
)
def test_a_png_grid_enlarges_each_image_to_at_least_64_pixels(tmp_path: Path, n, side, scale, columns, rows):
    """ceil(sqrt(n)) images per row, each enlarged by an integer factor to >= 64 px, 2 px between them."""
    images = torch.rand(n, 3, side, side) * 2 - 1  # [N, C, H, W] in [-1, 1]
    write_samples(images, tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as grid:
        cell = side * scale + 2
        assert grid.size == (columns * cell + 2, rows * cell + 2)
        pixels = np.asarray(grid.convert("RGB"))
    first = pixels[2 : 2 + side * scale, 2 : 2 + side * scale]  # the first image, enlarged (nearest neighbour)
    expected = ((images[0].permute(1, 2, 0) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(first, expected.repeat(scale, 0).repeat(scale, 1))


def test_default_counts_follow_the_output():
    assert [default_sample_count(Path(p)) for p in ("g.png", "G.PNG", "s.npz", "s.npy", "folder")] == [64, 64, 1000, 1000, 1000]


def test_sample_writes_a_readable_grid_by_default(tmp_path: Path, capsys):
    """A 1-step run on 8x8 digits: `-o grid.png` writes 64 images of 64 px (8 x 8, enlarged 8x); `-n` still counts."""
    run = tmp_path / "run"
    sets = [
        "data.kind=digits", "train.steps=1", "eval.num_samples=20", "eval.repeats=5", "eval.plot=false",
        "eval.feature_extractor=faulty_plugins:build_flat_features",
    ]
    code, _, err = cli(capsys, "run", str(ROOT / "recipes" / "tiny_8gaussians.toml"), "--out", str(run),
                       *[a for s in sets for a in ("--set", s)])
    assert code == 0, err
    code, _, err = cli(capsys, "sample", str(run), "-o", str(tmp_path / "grid.png"))
    assert code == 0, err
    assert err.strip() == f"wrote 64 samples of shape (1, 8, 8) to {tmp_path / 'grid.png'}"
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (8 * 66 + 2, 8 * 66 + 2)
    code, _, err = cli(capsys, "sample", str(run), "-n", "5", "-o", str(tmp_path / "five.png"))
    assert code == 0 and "wrote 5 samples" in err
    code, _, err = cli(capsys, "sample", str(run), "-o", str(tmp_path / "s.npz"))
    assert code == 0, err
    assert np.load(tmp_path / "s.npz")["samples"].shape == (1000, 1, 8, 8)
