"""Checkpoints: atomic layout, refusal of unsafe or corrupt files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from rewardtune import checkpoint as ckpt
from rewardtune.errors import CheckpointError

MARKER = Path("/tmp/rewardtune_pickle_payload_ran")


class Payload:
    def __reduce__(self):  # what a malicious pickle does: run code at load time
        return (MARKER.write_text, ("pwned",))


def committed(tmp_path: Path) -> Path:
    return ckpt.commit_checkpoint(tmp_path, 3, ckpt.flatten_modules({"net": nn.Linear(2, 2)}), {"step": 3})


def test_commit_writes_the_layout_and_latest_last(tmp_path: Path):
    path = committed(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "state.pt"]
    assert ckpt.latest_checkpoint(tmp_path) == path
    assert not list(tmp_path.glob(".tmp_*"))  # the staging folder was renamed into place
    weights, state, rng = ckpt.read_checkpoint(path)
    assert state == {"step": 3} and rng is None and set(weights) == {"net.weight", "net.bias"}


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path: Path):
    MARKER.unlink(missing_ok=True)
    path = committed(tmp_path)
    with open(path / "state.pt", "wb") as fh:
        pickle.dump({"step": Payload()}, fh)
    with pytest.raises(CheckpointError, match="refusing to load"):
        ckpt.read_checkpoint(path)
    assert not MARKER.exists()


def test_corrupt_and_truncated_files_are_checkpoint_errors(tmp_path: Path):
    path = committed(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        ckpt.read_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError):
        ckpt.read_checkpoint(path)
    (tmp_path / "latest").write_text("step_99999999")
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.latest_checkpoint(tmp_path)


def test_loading_into_a_different_module_is_a_checkpoint_error(tmp_path: Path):
    weights, _, _ = ckpt.read_checkpoint(committed(tmp_path))
    with pytest.raises(CheckpointError, match="does not fit module 'net'"):
        ckpt.load_modules({"net": nn.Linear(3, 2)}, weights)
    ckpt.load_modules({"net": nn.Linear(2, 2)}, weights)  # the matching module loads
    assert torch.is_tensor(weights["net.weight"])
