"""Small networks trained reproducibly on first use and cached as safetensors under $REWARDTUNE_CACHE (default
~/.cache/rewardtune): the digits classifier and the shapes classifier, which serve as offline feature extractors."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn


def cache_dir() -> Path:
    return Path(os.environ.get("REWARDTUNE_CACHE", Path.home() / ".cache" / "rewardtune"))


def cached_network(name: str, make: Callable[[], nn.Module], train: Callable[[], nn.Module]) -> nn.Module:
    """The network cached as `name` (a file name under `cache_dir()`), frozen and in eval mode: loaded into `make()`,
    or `train()`ed and cached when the file is missing or unreadable."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / name
    if path.exists():
        try:
            model = make()
            model.load_state_dict(load_file(str(path)))
            return model.eval().requires_grad_(False)
        except Exception:  # noqa: BLE001 (a corrupt cache, whatever the error, is rebuilt)
            path.unlink(missing_ok=True)
    model = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name of this process's own: processes starting together (accelerate ranks, parallel runs) each
    # train the network and the last rename wins, never a half-written file or a rename of a vanished one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return model.eval().requires_grad_(False)
