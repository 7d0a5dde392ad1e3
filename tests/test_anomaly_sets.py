"""Anomaly-detection image sets (`rewardtune.anomaly.sets`) and the sklearn baselines (`rewardtune.anomaly.baselines`).

MVTec-AD is read from the tiny synthetic layout `write_mvtec_layout` writes (white squares on textures whose values
stay in 40..200, so a defect's pixels are exactly those equal to 1.0 in every channel). The digits sets are checked
against the clean digits rebuilt here from sklearn, and the baselines against hand-computed energies.
"""

import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from rewardtune.anomaly.baselines import (
    BASELINES,
    GaussianPerLocation,
    IsolationForestDetector,
    KNNDistance,
)
from rewardtune.anomaly.sets import (
    DEFECT_KINDS,
    load_mvtec,
    make_digits_defects,
    make_digits_novelty,
    write_mvtec_layout,
)
from rewardtune.errors import RecipeError

# MVTec-AD layout ------------------------------------------------------------------------------------------------


@pytest.fixture
def mvtec_root(tmp_path):
    """bottle and grid, each 4 train/good, 2 test/good, 2 test/scratch (with masks), 32 x 32."""
    return write_mvtec_layout(tmp_path / "mvtec")


def test_load_mvtec_unified_shapes_labels_and_categories(mvtec_root):
    data = load_mvtec(mvtec_root, image_size=32)
    assert data.train.shape == (8, 3, 32, 32) and data.test.shape == (8, 3, 32, 32)
    assert data.train.dtype == torch.float32 and 0 <= data.test.min() and data.test.max() <= 1
    # unified setting: both categories' good images train together; sorted categories, then "good" < "scratch"
    assert data.train_categories == ["bottle"] * 4 + ["grid"] * 4
    assert data.categories == ["bottle"] * 4 + ["grid"] * 4
    assert data.defect_types == ["good", "good", "scratch", "scratch"] * 2
    assert data.labels.tolist() == [0, 0, 1, 1] * 2 and data.labels.dtype == torch.int64


def test_load_mvtec_masks_are_exactly_the_defect_squares(mvtec_root):
    data = load_mvtec(mvtec_root, image_size=32)
    white = (data.test == 1.0).all(dim=1)  # [M, H, W]: textures never reach 255, the defect square is 255
    assert data.masks.dtype == torch.bool
    assert torch.equal(data.masks, white)
    assert data.masks[data.labels == 1].sum(dim=(1, 2)).tolist() == [8 * 8] * 4  # side 32 // 4
    assert not data.masks[data.labels == 0].any()


def test_load_mvtec_one_category_and_resize(mvtec_root):
    data = load_mvtec(mvtec_root, categories=["grid"], image_size=16)
    assert data.train.shape == (4, 3, 16, 16) and data.masks.shape == (4, 16, 16)
    assert set(data.categories) == set(data.train_categories) == {"grid"}


def test_write_mvtec_layout_is_deterministic(tmp_path):
    first, again, other = (write_mvtec_layout(tmp_path / name, seed=seed) for name, seed in
                           [("a", 0), ("b", 0), ("c", 1)])
    path = "bottle/test/scratch/000.png"
    assert (first / path).read_bytes() == (again / path).read_bytes() != (other / path).read_bytes()
    assert (first / "grid/ground_truth/scratch/001_mask.png").is_file()


def _raises_naming(path, **kwargs):
    """load_mvtec raises a one-line RecipeError naming `path`."""
    root = kwargs.pop("root")
    with pytest.raises(RecipeError, match=re.escape(str(path))) as err:
        load_mvtec(root, image_size=8, **kwargs)
    assert "\n" not in str(err.value)


def test_load_mvtec_missing_root(tmp_path):
    _raises_naming(tmp_path / "absent", root=tmp_path / "absent")


def test_load_mvtec_no_categories(tmp_path):
    _raises_naming(tmp_path, root=tmp_path)


def test_load_mvtec_unknown_category(mvtec_root):
    _raises_naming(mvtec_root / "carpet", root=mvtec_root, categories=["bottle", "carpet"])


def test_load_mvtec_category_without_train_images(mvtec_root):
    shutil.rmtree(mvtec_root / "grid" / "train" / "good")
    _raises_naming(mvtec_root / "grid" / "train" / "good", root=mvtec_root)


def test_load_mvtec_non_image_file(mvtec_root):
    notes = mvtec_root / "bottle" / "test" / "good" / "notes.txt"
    notes.write_text("not an image")
    _raises_naming(notes, root=mvtec_root)


def test_load_mvtec_missing_mask(mvtec_root):
    mask = mvtec_root / "grid" / "ground_truth" / "scratch" / "001_mask.png"
    mask.unlink()
    _raises_naming(mask, root=mvtec_root)


# Digits ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_digits():
    """(images [1797, 1, 32, 32] in [0, 1], classes [1797]), built independently of the module under test."""
    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().unsqueeze(1) / 16
    return F.interpolate(pixels, size=32, mode="bilinear", align_corners=False), torch.from_numpy(digits.target)


@pytest.fixture(scope="module")
def defects():
    return make_digits_defects(seed=0)


def test_digits_defects_masks_are_exactly_the_changed_pixels(defects, clean_digits):
    images, _ = clean_digits
    assert defects.train.shape == (1500, 1, 32, 32) and defects.test.shape == (297, 1, 32, 32)
    torch.testing.assert_close(defects.train, images[:1500], rtol=0, atol=1e-6)  # float32 rounding only
    changed = (defects.test - images[1500:]).abs().squeeze(1) > 1e-6  # [297, 32, 32]
    assert torch.equal(defects.masks, changed)
    anomalous = defects.labels == 1
    assert int(anomalous.sum()) == 297 // 2
    assert defects.masks[anomalous].flatten(1).any(dim=1).all()  # every anomalous image has a non-empty mask
    assert not defects.masks[~anomalous].any()
    assert 0 <= defects.test.min() and defects.test.max() <= 1


def test_digits_defects_kinds_labels_and_visibility(defects, clean_digits):
    images, _ = clean_digits
    assert set(defects.defect_types) == {"good", *DEFECT_KINDS}
    assert defects.labels.tolist() == [int(kind != "good") for kind in defects.defect_types]
    assert defects.categories == ["digits"] * 297 and defects.train_categories == ["digits"] * 1500
    # every defect survives 4x area downsampling to 8 x 8 (0.1 = 1.6 of the digits' 16 grey levels)
    change_8x8 = (F.avg_pool2d(defects.test, 4) - F.avg_pool2d(images[1500:], 4)).abs().amax(dim=(1, 2, 3))
    assert change_8x8[defects.labels == 1].min() >= 0.1


def test_digits_defects_deterministic_per_seed(defects):
    again, other = make_digits_defects(seed=0), make_digits_defects(seed=1)
    assert torch.equal(again.test, defects.test) and torch.equal(again.masks, defects.masks)
    assert again.defect_types == defects.defect_types
    assert not torch.equal(other.masks, defects.masks)


def test_digits_defects_num_test_normal_and_errors():
    data = make_digits_defects(size=16, num_test_normal=290)
    assert data.test.shape == (297, 1, 16, 16) and int(data.labels.sum()) == 7
    assert set(data.defect_types) == {"good", *DEFECT_KINDS}
    with pytest.raises(ValueError, match="num_test_normal"):
        make_digits_defects(num_test_normal=298)


def test_digits_novelty(clean_digits):
    images, classes = clean_digits
    data = make_digits_novelty(3)
    keep = classes[:1500] != 3
    torch.testing.assert_close(data.train, images[:1500][keep], rtol=0, atol=1e-6)
    assert data.train.shape[0] == int(keep.sum()) < 1500  # no held-out digit in training
    assert data.labels.tolist() == (classes[1500:] == 3).long().tolist()
    assert data.masks is None and data.categories == ["held_out_3"] * 297
    assert data.defect_types == ["digit_3" if label else "good" for label in data.labels.tolist()]
    for bad in (-1, 10):
        with pytest.raises(ValueError, match="held_out"):
            make_digits_novelty(bad)


# Baselines ------------------------------------------------------------------------------------------------------


def _near_and_far(seed=0):
    """Train [32, 4, 3, 3]; test [4, 4, 3, 3]: two copies of training maps, then the same two shifted by 3."""
    gen = torch.Generator().manual_seed(seed)
    train = 0.1 * torch.randn(32, 4, 3, 3, generator=gen)
    return train, torch.cat([train[:2], train[:2] + 3.0])


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_rank_far_vectors_above_training_ones(name):
    train, test = _near_and_far()
    energy = BASELINES[name]().fit(train).energy_map(test)
    assert energy.shape == (4, 3, 3) and energy.dtype == torch.float32 and energy.isfinite().all()
    assert energy[2:].min() > energy[:2].max()


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_shape_errors(name):
    train, _ = _near_and_far()
    detector = BASELINES[name]()
    with pytest.raises(ValueError, match="fit"):
        detector.energy_map(train)  # before fit
    detector.fit(train)
    for bad in (torch.zeros(2, 5, 3, 3), torch.zeros(2, 4, 2, 3), torch.zeros(4, 3, 3)):
        with pytest.raises(ValueError, match=re.escape(name)) as err:
            detector.energy_map(bad)
        assert "\n" not in str(err.value)


def test_knn_distance_exact_values():
    # 1-D vectors at one location: training values 0, 1, 3
    train = torch.tensor([0.0, 1.0, 3.0]).view(3, 1, 1, 1)
    test = torch.tensor([0.0, 2.0, 5.0]).view(3, 1, 1, 1)
    nearest = KNNDistance(k=1).fit(train).energy_map(test).flatten()
    two = KNNDistance(k=2).fit(train).energy_map(test).flatten()
    # k=1: 0 (a training vector), 1, 2; k=2: (0 + 1) / 2, (1 + 1) / 2, (2 + 4) / 2
    torch.testing.assert_close(nearest, torch.tensor([0.0, 1.0, 2.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(two, torch.tensor([0.5, 1.0, 3.0]), rtol=0, atol=1e-6)


def test_knn_max_train_subsamples_by_seed():
    train, _ = _near_and_far()
    first, again = (KNNDistance(max_train=10, seed=3).fit(train) for _ in range(2))
    assert first.index.n_samples_fit_ == 10
    np.testing.assert_array_equal(first.index._fit_X, again.index._fit_X)


def test_gaussian_mahalanobis_matches_hand_computation():
    # At each location, 4 points mean + (+-a, 0), (0, +-a): the MLE covariance is (a^2 / 2) I, which is also the
    # Ledoit-Wolf shrinkage target, so the fitted covariance is (a^2 / 2) I whatever the shrinkage.
    offsets = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # [4, 2]
    scales, means = torch.tensor([2.0, 0.5]), torch.tensor([[1.0, -1.0], [3.0, 0.5]])  # per location (0, 0), (0, 1)
    train = (means.unsqueeze(0) + scales.view(1, 2, 1) * offsets.unsqueeze(1))  # [4, 2 locations, 2 dims]
    train = train.permute(0, 2, 1).reshape(4, 2, 1, 2)  # [N, D, h, w]
    points = torch.tensor([[[2.0, 1.0], [3.0, 0.5]], [[-3.0, 4.0], [0.0, 0.0]]])  # [M, location, D]
    energy = GaussianPerLocation().fit(train).energy_map(points.permute(0, 2, 1).reshape(2, 2, 1, 2))
    expected = (points - means).norm(dim=-1) / (scales**2 / 2).sqrt()  # |x - mu| / sigma
    torch.testing.assert_close(energy.view(2, 2), expected, rtol=0, atol=1e-4)


def test_gaussian_anisotropic_matches_ledoit_wolf_oracle():
    from sklearn.covariance import ledoit_wolf

    gen = torch.Generator().manual_seed(1)
    mix = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.3, -0.2, 0.1]])
    train = (torch.randn(50, 2, 3, generator=gen) @ mix).permute(0, 2, 1).reshape(50, 3, 1, 2).double()
    test = torch.randn(5, 3, 1, 2, generator=gen, dtype=torch.float64)
    energy = GaussianPerLocation().fit(train).energy_map(test)  # [5, 1, 2]
    for j in range(2):
        vectors = train[:, :, 0, j].numpy()
        precision = np.linalg.inv(ledoit_wolf(vectors)[0])
        diff = test[:, :, 0, j].numpy() - vectors.mean(axis=0)
        expected = np.sqrt(np.einsum("md,de,me->m", diff, precision, diff))
        np.testing.assert_allclose(energy[:, 0, j].numpy(), expected, rtol=1e-5)


def test_isolation_forest_ranks_outlier_above_inliers():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(64, 2, 2, 2, generator=gen)
    test = torch.randn(3, 2, 2, 2, generator=gen)
    test[1, :, 0, 1] = 10.0  # one outlying spatial vector
    energy = IsolationForestDetector(n_estimators=50).fit(train).energy_map(test)
    outlier = energy[1, 0, 1]
    others = torch.cat([energy.flatten()[:5], energy.flatten()[6:]])  # flat index 1 * 4 + 0 * 2 + 1 = 5
    assert outlier > others.max()
    again = IsolationForestDetector(n_estimators=50).fit(train).energy_map(test)
    assert torch.equal(energy, again)  # seeded
