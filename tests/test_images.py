"""Image backbones, data, the ResNet value and the image metrics, on tiny models saved and loaded the real way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rewardtune.backbones.ddpm import build_ddpm_backbone
from rewardtune.data.images import build_digits, build_image_folder
from rewardtune.errors import PluginError
from rewardtune.metrics.fid import frechet_distance
from rewardtune.metrics.precision_recall import precision_recall
from rewardtune.nets.resnet import ResNetEnergy, build_resnet_value

TINY_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1, "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
}


@pytest.fixture(scope="module")
def tiny_unet_dir(tmp_path_factory) -> Path:
    from diffusers import UNet2DModel

    path = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    UNet2DModel(**TINY_UNET).save_pretrained(path)
    return path


def test_ddpm_backbone_loads_through_from_pretrained(tiny_unet_dir: Path):
    from diffusers import UNet2DModel

    policy = build_ddpm_backbone((1, 8, 8), pretrained=str(tiny_unet_dir), num_steps=4)
    reference = UNet2DModel.from_pretrained(tiny_unet_dir)
    x, k = torch.randn(3, 1, 8, 8), torch.tensor([10.0, 500.0, 999.0])
    with torch.no_grad():
        torch.testing.assert_close(policy.predict_eps(x, k), reference(x, k).sample)  # same weights, same call
    traj = policy.sample(5, torch.Generator().manual_seed(0))
    assert traj.states.shape == (5, 5, 1, 8, 8)
    # FastDPM at T = 4: the last sigma is frozen at the floor and gets no gradient (fix_last_sigma default)
    policy.sigma().sum().backward()
    assert policy.log_sigma.grad[-1] == 0 and policy.log_sigma.grad[0] != 0


def test_ddpm_backbone_offline_error_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PluginError, match="cannot load UNet2DModel 'nobody/no-such-unet'") as info:
        build_ddpm_backbone((3, 32, 32), pretrained="nobody/no-such-unet")
    assert "\n" not in str(info.value)


def test_ddpm_backbone_random_init_and_shape_checks():
    policy = build_ddpm_backbone((1, 8, 8), pretrained="", unet=TINY_UNET, num_steps=3, schedule="strided")
    assert policy.num_steps == 3
    with pytest.raises(ValueError, match="either pretrained"):
        build_ddpm_backbone((1, 8, 8), pretrained="x", unet=TINY_UNET)
    with pytest.raises(ValueError, match="data are 3x32x32"):
        build_ddpm_backbone((3, 32, 32), pretrained="", unet=TINY_UNET)


def test_resnet_energy_has_about_five_million_parameters_at_cifar_size():
    net = ResNetEnergy(3, 128)
    assert 4.9e6 < sum(p.numel() for p in net.parameters()) < 5.2e6
    assert net(torch.randn(2, 3, 32, 32)).shape == (2,)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in net.modules())
    value = build_resnet_value((1, 8, 8), channels=8)
    assert value(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)).shape == (4,)


def test_digits_are_real_images_in_range():
    data = build_digits()
    assert data.sample_shape == (1, 8, 8) and len(data) == 1797
    assert data.images.min() == -1 and data.images.max() == 1
    batch = data.sample(16, torch.Generator().manual_seed(0))
    assert batch.shape == (16, 1, 8, 8)
    assert len(build_digits(digit=3)) == 183


def test_image_folder(tmp_path: Path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (12, 12), color=(i * 100, 0, 0)).save(tmp_path / f"{i}.png")
    data = build_image_folder(path=str(tmp_path), size=8)
    assert data.sample_shape == (3, 8, 8)
    assert float(data.images[:, 0].max()) == pytest.approx(200 / 127.5 - 1)


def test_frechet_distance_of_gaussians_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    n, d = 200_000, 3
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 1
    # N(0, I) vs N(1, 4I): ||mu||^2 + tr(I + 4I - 2*2I) = 3 + 3 = 6; Monte Carlo error ~ 1e-2 at n = 2e5
    assert frechet_distance(a, b) == pytest.approx(6.0, abs=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_precision_recall_extremes():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 4, generator=g)
    same = torch.randn(2000, 4, generator=g)
    far = torch.randn(2000, 4, generator=g) + 20
    collapsed = torch.randn(2000, 4, generator=g) * 0.01
    p, r = precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    assert precision_recall(real, far) == (0.0, 0.0)
    p, r = precision_recall(real, collapsed)  # mode collapse: precise but no recall
    assert p > 0.99 and r < 0.1


def test_trace_sqrt_product_matches_the_matrix_square_root_for_non_commuting_and_singular_covariances():
    from scipy.linalg import sqrtm

    from rewardtune.metrics.fid import trace_sqrt_product

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 3))
    s1, s2 = a @ a.T, b @ b.T  # s2 has rank 3; s1 and s2 do not commute
    expected = np.trace(sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-6)
    assert trace_sqrt_product(s1, s1) == pytest.approx(np.trace(s1), rel=1e-9)  # Tr((S S)^(1/2)) = Tr S


def test_processes_building_the_digits_classifier_cache_together_all_succeed(tmp_path: Path):
    """Each process writes the cache under a temporary name of its own (parallel runs and accelerate ranks
    once collided on one name: FileNotFoundError at the rename)."""
    import os
    import subprocess
    import sys

    code = "from rewardtune.nets.digits import load_digits_classifier; load_digits_classifier()"
    env = {**os.environ, "REWARDTUNE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert [p.name for p in tmp_path.iterdir()] == ["digits_classifier.safetensors"]


def test_the_digits_splits_partition_the_digits_as_the_classifier_does():
    from rewardtune.nets.digits import TRAIN_COUNT

    every, train, test = (build_digits(split=s) for s in ("all", "train", "test"))
    assert len(train.images) == TRAIN_COUNT and len(train.images) + len(test.images) == len(every.images)
    assert torch.equal(torch.cat([train.images, test.images]), every.images)
    with pytest.raises(ValueError, match="unknown digits split"):
        build_digits(split="validation")
