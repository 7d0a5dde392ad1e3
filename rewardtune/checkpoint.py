"""Crash-safe checkpoints: weights in safetensors, small state with torch.save (loaded with weights_only=True).

Layout of a run directory's `checkpoints/`:

    step_00001000/model.safetensors   all module weights, flattened as "<module>.<param>"
    step_00001000/state.pt            optimiser states, algorithm state (AVR), step, initial metrics
    step_00001000/rng_rank<r>.pt      each process's random-generator states
    latest                            the name of the newest complete checkpoint (written last, atomically)

A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced only after that,
so a crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rewardtune.errors import CheckpointError
from rewardtune.sharding import full_tensors, shard_like

LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def flatten_modules(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """{"<module>.<key>": tensor}, each tensor cloned to CPU so that shared storage is saved independently.

    A tensor sharded by FSDP is gathered whole (a collective: under FSDP every rank calls this, in the same order)."""
    flat = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            flat[f"{name}.{key}"] = full_tensors(value.detach()).cpu().contiguous().clone()
    return flat


def load_modules(modules: dict[str, torch.nn.Module], flat: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Load `flat` (from `flatten_modules`) into `modules`; a missing or unexpected key is a CheckpointError.

    Into a module sharded by FSDP, each rank loads its own shard of the full tensors (no communication)."""
    for name, module in modules.items():
        prefix = f"{name}."
        sub = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
        try:
            current = module.state_dict()
            sub = {k: shard_like(v, current[k]) if k in current else v for k, v in sub.items()}
            module.load_state_dict(sub, strict=strict)
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()
            raise CheckpointError(f"checkpoint does not fit module {name!r}: {first[-1].strip() if first else err}")


def staging_dir(root: Path, step: int) -> Path:
    return root / f".tmp_{checkpoint_name(step)}"


def write_rng(root: Path, step: int, rank: int, rng_state: dict) -> None:
    """Each process writes its own RNG state into the staging folder (before the main process commits)."""
    tmp = staging_dir(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state, tmp / f"rng_rank{rank}.pt")


def commit_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict, *, keep: int = 2) -> Path:
    """Main process: write `weights` (`flatten_modules`) and `state` into the staging folder, rename it into place,
    then point `latest`."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    final = root / checkpoint_name(step)
    old = root / f".old_{final.name}"
    if final.exists():  # re-saving a step: keep the old copy until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names)."""
    latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    done = sorted(p for p in root.glob("step_*") if p.is_dir())  # never includes best/
    for old in done[:-keep] if keep > 0 else []:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir() and (root / f".old_{path.name}").is_dir():  # a crash while re-saving that step
        path = root / f".old_{path.name}"
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def read_checkpoint(path: Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """(weights, state, this rank's RNG state or None) of one checkpoint folder."""
    try:
        weights = load_file(str(path / "model.safetensors"))
    except Exception as err:  # noqa: BLE001 (safetensors raises several types for truncated/corrupt files)
        raise CheckpointError(f"cannot read {path / 'model.safetensors'}: {err}") from None
    state = safe_torch_load(path / "state.pt")
    rng_path = path / f"rng_rank{rank}.pt"
    rng = safe_torch_load(rng_path) if rng_path.exists() else None
    return weights, state, rng


def safe_torch_load(path: Path) -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary pickled objects."""
    if not path.exists():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (unpickling errors have no common base)
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"refusing to load {path}: {msg}") from None


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def copy_as_best(root: Path, step: int, info: dict) -> Path:
    """Copy checkpoint `step` to root/best (atomically replacing the previous best) with best.json beside it."""
    source = root / checkpoint_name(step)
    tmp = root / ".tmp_best"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n")
    best = root / "best"
    old = root / ".old_best"
    if best.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
    return best
