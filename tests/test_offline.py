"""Offline, a hub-backed source fails with exactly one line on stderr (`error: ...`), not library warnings and logs
first (issue #12, item 6). Each case runs the console script in a subprocess, so whatever huggingface_hub,
diffusers, open_clip, clean-fid or urllib print is seen as a user would see it. HF_HUB_OFFLINE=1 stops the hub, and
an unreachable proxy stops plain URL downloads even on a machine that is online.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_rewards import tiny_clip_dir  # noqa: F401 (a fixture: a random 1-layer open_clip model in a folder)

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once
IMAGES = '[data]\nkind = "digits"\n[eval]\nnum_samples = 20\nplot = false\nfeature_extractor = "{features}"\n'
SMALL = '[backbone]\nkind = "mlp"\nnum_steps = 2\nhidden = 8\ndepth = 1\ntime_dim = 8\n[train]\nsteps = 0\nbatch_size = 4\n'


def offline_run(tmp_path: Path, patch: str) -> subprocess.CompletedProcess:
    """`rewardtune run` on tiny_8gaussians.toml with the tables of `patch` (TOML) replacing its own."""
    import tomllib

    import tomli_w

    raw = {**tomllib.loads((ROOT / "recipes" / "tiny_8gaussians.toml").read_text()), **tomllib.loads(patch)}
    recipe = tmp_path / "offline.toml"
    recipe.write_text(tomli_w.dumps(raw))
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "REWARDTUNE_CACHE": str(tmp_path / "cache"),
        "http_proxy": UNREACHABLE, "https_proxy": UNREACHABLE, "HTTP_PROXY": UNREACHABLE, "HTTPS_PROXY": UNREACHABLE,
        "no_proxy": "", "NO_PROXY": "", "PYTHONPATH": str(ROOT / "tests"),
    }
    return subprocess.run(
        [sys.executable, "-m", "rewardtune", "run", str(recipe), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False,
    )


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_ddpm_hub_id_offline(tmp_path: Path):
    patch = IMAGES.format(features="digits") + SMALL.replace('kind = "mlp"\nnum_steps = 2\nhidden = 8\ndepth = 1\ntime_dim = 8',
                                                             'kind = "ddpm"\npretrained = "google/ddpm-cifar10-32"\nnum_steps = 2')
    assert_one_error_line(offline_run(tmp_path, patch), "cannot load UNet2DModel 'google/ddpm-cifar10-32'")


def test_clip_reward_offline(tmp_path: Path):
    patch = IMAGES.format(features="digits") + SMALL + '[reward]\nkind = "clip"\nmodel = "ViT-B-32"\npretrained = "openai"\n'
    assert_one_error_line(offline_run(tmp_path, patch), "clip: cannot load open_clip model ViT-B-32 (pretrained 'openai')")


def test_aesthetic_reward_offline(tmp_path: Path):
    patch = IMAGES.format(features="digits") + SMALL + '[reward]\nkind = "aesthetic"\n'
    assert_one_error_line(offline_run(tmp_path, patch), "aesthetic: cannot load open_clip model ViT-L-14 (pretrained 'openai')")


def test_aesthetic_head_download_offline(tmp_path: Path, tiny_clip_dir: Path):  # noqa: F811
    """The CLIP model is local; the head's URL cannot be reached."""
    patch = IMAGES.format(features="digits") + SMALL + (
        f'[reward]\nkind = "aesthetic"\nmodel = "local-dir:{tiny_clip_dir}"\nhead = "{UNREACHABLE}/head.pth"\n'
    )
    assert_one_error_line(offline_run(tmp_path, patch), "aesthetic: cannot download the head weights")


@pytest.mark.skipif(Path("/tmp/inception-2015-12-05.pt").exists(), reason="clean-fid's Inception is cached: loads offline")
def test_inception_features_offline(tmp_path: Path):
    patch = IMAGES.format(features="inception") + SMALL
    assert_one_error_line(offline_run(tmp_path, patch), "cannot build clean-fid's Inception")
