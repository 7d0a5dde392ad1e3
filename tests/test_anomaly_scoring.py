"""Anomaly scoring (rewardtune.anomaly.scoring and `rewardtune score`): max pooling and bilinear upsampling on
hand-made maps, AUROCs on hand-counted cases, a folder in MVTec's test layout end to end with a closed-form fake
model, and the CLI's one-line errors."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli
from PIL import Image

from rewardtune.anomaly import scoring
from rewardtune.errors import RecipeError, RewardtuneError

GRID = 4  # the fake model's energy grid
SIZE = 16  # test images are SIZE x SIZE, so each grid cell covers 4 x 4 pixels
CELL = SIZE // GRID


class BrightnessModel:
    """A fake AnomalyModel: the energy of a grid cell is the mean brightness of its pixels ([N, C, H, W] ->
    [N, 4, 4]), so a bright square on a dark image is the anomaly."""

    def __init__(self, image_channels: int = 1, image_size: int | None = None) -> None:
        self.image_channels = image_channels
        self.image_size = image_size

    def energy_map(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.mean(dim=1, keepdim=True), GRID)[:, 0]


# Scores and maps


def test_image_scores_are_the_largest_energy_of_each_map():
    maps = torch.tensor([[[0.0, 3.0], [1.0, 2.0]], [[-1.0, -4.0], [-2.0, -3.0]]])
    torch.testing.assert_close(scoring.image_scores(maps), torch.tensor([3.0, -1.0]))  # exact: a max


def test_localisation_maps_upsample_bilinearly_with_half_pixel_centres():
    # align_corners=False: output pixel i of 4 sits at source coordinate (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75,
    # 1.25, clamped to [0, 1], so each axis mixes the two source cells with weights w = 0, 0.25, 0.75, 1 on the
    # second one. A map linear in (row, col) stays linear: [[0, 4], [8, 12]] -> 8 * w_row + 4 * w_col.
    w = torch.tensor([0.0, 0.25, 0.75, 1.0])
    linear = torch.tensor([[[0.0, 4.0], [8.0, 12.0]]])
    expected = 8 * w[:, None] + 4 * w[None, :]
    torch.testing.assert_close(scoring.localisation_maps(linear, (4, 4))[0], expected, rtol=0, atol=1e-6)
    # One hot corner [[0, 0], [0, 4]]: the product of the axis weights, 4 * w_row * w_col.
    corner = torch.tensor([[[0.0, 0.0], [0.0, 4.0]]])
    torch.testing.assert_close(scoring.localisation_maps(corner, (4, 4))[0], 4 * w[:, None] * w[None, :], rtol=0, atol=1e-6)


def test_maps_must_be_three_dimensional():
    with pytest.raises(ValueError, match=r"must be \[N, h, w\]"):
        scoring.image_scores(torch.zeros(2, 2))


def test_score_images_in_batches_equals_one_batch():
    images = torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    scores, maps = scoring.score_images(BrightnessModel(), images, batch_size=2)
    one_scores, one_maps = scoring.score_images(BrightnessModel(), images, batch_size=64)
    assert scores.shape == (5,) and maps.shape == (5, SIZE, SIZE)
    torch.testing.assert_close(scores, one_scores, rtol=0, atol=0)  # the same per-image arithmetic
    torch.testing.assert_close(maps, one_maps, rtol=0, atol=0)


def test_score_images_refuses_a_model_of_the_wrong_shape():
    class Flat(BrightnessModel):
        def energy_map(self, images):
            return super().energy_map(images).flatten(1)

    with pytest.raises(ValueError, match=r"must be \[2, h, w\]"):
        scoring.score_images(Flat(), torch.zeros(2, 1, SIZE, SIZE))


def test_score_images_refuses_non_finite_energies():
    class Broken(BrightnessModel):
        def energy_map(self, images):
            return super().energy_map(images) / images.amax(dim=(1, 2, 3))[:, None, None]  # 0/0 for a black image

    images = torch.ones(3, 1, SIZE, SIZE)
    images[2] = 0
    with pytest.raises(RewardtuneError, match=r"non-finite energies for image 2 \(0-based\)"):
        scoring.score_images(Broken(), images, batch_size=2)


# AUROC


def test_image_auroc_on_known_cases():
    labels = torch.tensor([0, 0, 1, 1])
    assert scoring.image_auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert scoring.image_auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    # Anomalous 0.35 beats normal 0.1 but not 0.4; anomalous 0.8 beats both: 3 of 4 pairs.
    assert scoring.image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75, abs=1e-12)


def test_pixel_auroc_counts_ties_as_half():
    # Defect pixels {1, 2} vs normal {1, 0}: pairs 1-1 tie (1/2), 1-0, 2-1, 2-0 won: 3.5 / 4.
    maps = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    masks = torch.tensor([[[False, True], [True, False]]])
    assert scoring.pixel_auroc(maps, masks) == pytest.approx(0.875, abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_auroc_needs_both_classes(labels):
    with pytest.raises(ValueError, match="AUROC needs both normal and anomalous images"):
        scoring.image_auroc([0.1, 0.2, 0.3], labels)
    with pytest.raises(ValueError, match="AUROC needs both normal and anomalous pixels"):
        scoring.pixel_auroc(torch.zeros(1, 1, 3), torch.tensor([[labels]], dtype=torch.bool))


def test_per_category_auroc_and_means():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.1, 0.9])
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    categories = ["bottle"] * 4 + ["cable"] * 2
    maps = torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]], [[1.0, 1.0]], [[2.0, 0.0]]])
    masks = torch.tensor([[[False, True]], [[False, False]], [[False, False]], [[False, False]],
                          [[False, False]], [[True, False]]])
    result = scoring.per_category_auroc(scores, labels, categories, maps, masks)
    assert result["bottle"]["image_auroc"] == pytest.approx(0.75)  # the hand-counted case above
    assert result["cable"]["image_auroc"] == 1.0
    assert result["bottle"]["pixel_auroc"] == 1.0  # its one defect pixel (1.0) beats every other (0.0)
    # cable: defect pixel 2.0 beats the three normal pixels 1, 1, 0.
    assert result["cable"]["pixel_auroc"] == 1.0
    assert result["mean"] == {"image_auroc": pytest.approx(0.875), "pixel_auroc": 1.0}
    # Without defect pixels in a category, its pixel AUROC is left out, and out of the mean.
    masks[0] = False
    result = scoring.per_category_auroc(scores, labels, categories, maps, masks)
    assert "pixel_auroc" not in result["bottle"] and result["mean"]["pixel_auroc"] == 1.0
    with pytest.raises(ValueError, match="category 'cable': AUROC needs both"):
        scoring.per_category_auroc(scores, torch.tensor([0, 0, 1, 1, 1, 1]), categories)


# Folders


def write_png(path: Path, pixels: np.ndarray) -> None:
    """pixels [H, W] (grey) or [H, W, 3] in [0, 1] -> an 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)


def dark(level: float = 0.2, size: int = SIZE) -> np.ndarray:
    return np.full((size, size), level)


def with_square(row: int, col: int, base: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """A dark image with one bright grid cell, and its mask."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = True
    return np.where(mask, 1.0, base), mask


@pytest.fixture
def mvtec(tmp_path) -> tuple[Path, Path]:
    """(test folder, ground_truth folder) of one MVTec-like category: 3 good images, 2 crack, 1 scratch (its mask
    named <stem>.png, MVTec's other spelling)."""
    test, truth = tmp_path / "bottle" / "test", tmp_path / "bottle" / "ground_truth"
    for i, level in enumerate((0.1, 0.15, 0.2)):
        write_png(test / "good" / f"{i:03d}.png", dark(level))
    for name, (row, col), mask_name in (("crack/000", (1, 1), "crack/000_mask"), ("crack/001", (0, 3), "crack/001_mask"),
                                        ("scratch/000", (3, 2), "scratch/000")):
        image, mask = with_square(row, col)
        write_png(test / f"{name}.png", image)
        write_png(truth / f"{mask_name}.png", mask.astype(float))
    (test / ".DS_Store").write_bytes(b"\0junk")  # hidden: skipped
    return test, truth


def test_read_folder_labels_the_mvtec_test_layout(mvtec):
    scan = scoring.read_folder(mvtec[0], 1)
    assert [p.as_posix() for p in scan.paths] == [
        "crack/000.png", "crack/001.png", "good/000.png", "good/001.png", "good/002.png", "scratch/000.png",
    ]
    assert scan.labels.tolist() == [1, 1, 0, 0, 0, 1]
    assert scan.defect_types == ["crack", "crack", "good", "good", "good", "scratch"]
    assert scan.images.shape == (6, 1, SIZE, SIZE) and scan.images.dtype == torch.float32
    assert scan.images[2].unique().tolist() == [pytest.approx(round(0.1 * 255) / 255)]  # 8-bit levels / 255


def test_read_folder_flat_rgb_and_resized(tmp_path):
    write_png(tmp_path / "a.png", dark(0.5, size=8))
    write_png(tmp_path / "b.png", np.full((12, 10, 3), 0.5))
    with pytest.raises(RecipeError, match=r"different sizes: .*a\.png is 8x8, .*b\.png is 10x12"):
        scoring.read_folder(tmp_path, 3)
    scan = scoring.read_folder(tmp_path, 3, image_size=SIZE)  # resized, whatever the sizes
    assert scan.labels is None and scan.defect_types is None
    assert scan.images.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(scan.images, torch.full_like(scan.images, 128 / 255), rtol=0, atol=1e-6)  # constant


def test_read_masks_follows_ground_truth(mvtec):
    test, truth = mvtec
    scan = scoring.read_folder(test, 1)
    masks = scoring.read_masks(truth, scan)
    assert masks.dtype == torch.bool and masks.shape == (6, SIZE, SIZE)
    assert masks.sum(dim=(1, 2)).tolist() == [CELL * CELL, CELL * CELL, 0, 0, 0, CELL * CELL]
    assert masks[0, CELL:2 * CELL, CELL:2 * CELL].all()  # crack/000: cell (1, 1)
    (truth / "crack" / "001_mask.png").unlink()
    with pytest.raises(RecipeError, match=r"no mask for the anomalous image .*crack/001\.png: expected .*001_mask\.png"):
        scoring.read_masks(truth, scan)


def test_write_overlays_blends_the_heat_map(tmp_path):
    images = torch.zeros(2, 1, 4, 4)
    maps = torch.stack([torch.zeros(4, 4), torch.ones(4, 4)])
    paths = [Path("good/000.png"), Path("crack/a.jpg")]
    written = scoring.write_overlays(images, maps, paths, tmp_path, colormap="gray", alpha=0.5)
    assert [p.name for p in written] == ["good__000.png", "crack__a.jpg.png"]
    # gray maps the lowest energy to black and the highest to white; half of white on black is 128/255 rounded.
    low, high = (np.array(Image.open(p)) for p in written)
    assert low.shape == (4, 4, 3) and (low == 0).all() and (high == 128).all()
    # An RGB image under alpha = 0 comes back as it was (pure red stays 255, 0, 0).
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    (file,) = scoring.write_overlays(red, maps[:1], ["red.png"], tmp_path, alpha=0.0)
    assert (np.array(Image.open(file)) == [255, 0, 0]).all()


def test_score_folder_end_to_end(mvtec, tmp_path):
    test, truth = mvtec
    out = tmp_path / "scores"
    summary = scoring.score_folder(BrightnessModel(), test, out, masks_dir=truth)
    # Image: each defect's bright cell (energy 1) tops every good image (at most 0.2). Pixel: inside a bright cell
    # the upsampled map keeps >= 0.625^2 of the bright cell's weight, outside it <= 0.375, on a 0.2 base (or darker).
    assert summary["image_auroc"] == 1.0 and summary["pixel_auroc"] == 1.0
    assert summary["images"] == 6 and summary["anomalous"] == 3 and summary["notes"] == []
    assert json.loads((out / "auroc.json").read_text()) == {k: v for k, v in summary.items() if k != "files"}
    rows = list(csv.DictReader((out / "scores.csv").read_text().splitlines()))
    assert [r["path"] for r in rows][:3] == ["crack/000.png", "crack/001.png", "good/000.png"]
    assert rows[0]["label"] == "1" and rows[0]["defect_type"] == "crack" and float(rows[0]["score"]) == 1.0
    assert float(rows[2]["score"]) == pytest.approx(26 / 255)  # good/000: level 0.1 stored as 26/255
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [
        "crack__000.png", "crack__001.png", "good__000.png", "good__001.png", "good__002.png", "scratch__000.png",
    ]


def test_score_folder_without_labels_or_anomalies(tmp_path):
    write_png(tmp_path / "in" / "a.png", dark())
    summary = scoring.score_folder(BrightnessModel(), tmp_path / "in", tmp_path / "out")
    assert "image_auroc" not in summary and "no good/ subfolder" in summary["notes"][0]
    assert not (tmp_path / "out" / "auroc.json").exists()
    assert (tmp_path / "out" / "scores.csv").read_text().splitlines()[0] == "path,score"
    with pytest.raises(RecipeError, match="masks need labels"):
        scoring.score_folder(BrightnessModel(), tmp_path / "in", tmp_path / "out", masks_dir=tmp_path / "in")
    write_png(tmp_path / "good_only" / "good" / "a.png", dark())
    summary = scoring.score_folder(BrightnessModel(), tmp_path / "good_only", tmp_path / "out2")
    assert summary["notes"] == ["no image AUROC: AUROC needs both normal and anomalous images: all 1 are normal"]


# The CLI




@pytest.fixture
def fake_model(monkeypatch) -> list:
    """`rewardtune score` gets a BrightnessModel from `load_anomaly_model` (through `scoring.load_model_for`); the
    list records the (run_dir, best) it was asked for."""
    calls = []

    def load(run_dir, *, best=False):
        calls.append((Path(run_dir), best))
        return BrightnessModel()

    monkeypatch.setattr("rewardtune.anomaly.model.load_anomaly_model", load)
    return calls


def test_cli_score_writes_and_prints_the_aurocs(capsys, mvtec, tmp_path, fake_model):
    test, truth = mvtec
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "score", tmp_path / "run", test, "--masks", truth, "-o", out, "--best")
    assert code == 0, stderr
    assert fake_model == [(tmp_path / "run", True)]
    assert "6 images, 3 anomalous" in stdout
    assert "image AUROC" in stdout and "pixel AUROC" in stdout and stdout.count("1.0000") == 2
    assert f"scores: {out / 'scores.csv'}" in stderr and f"auroc: {out / 'auroc.json'}" in stderr
    assert (out / "scores.csv").is_file() and (out / "auroc.json").is_file() and len(list((out / "overlays").iterdir())) == 6


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line of stderr (and no traceback)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def bad_folder(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """(input folder, extra arguments) of one bad input."""
    folder = tmp_path / "in"
    if case == "not an image":
        write_png(folder / "a.png", dark())
        (folder / "notes.txt").write_text("hello\n")
    elif case == "mixed sizes":
        write_png(folder / "a.png", dark())
        write_png(folder / "b.png", dark(size=8))
    elif case == "empty":
        folder.mkdir()
        (folder / ".hidden.png").write_bytes(b"")
    elif case == "missing mask":
        write_png(folder / "good" / "000.png", dark())
        write_png(folder / "crack" / "000.png", with_square(0, 0)[0])
        (tmp_path / "truth" / "crack").mkdir(parents=True)
        return folder, ["--masks", str(tmp_path / "truth")]
    return folder, []


@pytest.mark.parametrize(("case", "message"), [
    ("not an image", r"error: .*in/notes\.txt is not an image \(PNG, JPEG, BMP or TIFF\)"),
    ("mixed sizes", r"error: images of different sizes: .*in/a\.png is 16x16, .*in/b\.png is 8x8"),
    ("empty", r"error: no images \(PNG, JPEG, BMP or TIFF\) in .*in$"),
    ("missing", r"error: input folder .*in does not exist$"),
    ("missing mask", r"error: no mask for the anomalous image .*in/crack/000\.png: expected .*truth/crack/000_mask\.png$"),
])
def test_cli_score_bad_input_is_one_line(capsys, tmp_path, fake_model, case, message):
    folder, extra = bad_folder(tmp_path, case)
    code, stdout, stderr = run_cli(capsys, "score", tmp_path / "run", folder, "-o", tmp_path / "out", *extra)
    assert code == 2
    assert stdout == ""
    line = one_error_line(stderr)
    assert re.search(message, line), line
    assert not (tmp_path / "out" / "scores.csv").exists()
