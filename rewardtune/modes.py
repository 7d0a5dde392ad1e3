"""Train/eval mode for a block: `eval_mode(*modules)`, used by the trainer (evaluation) and DxDP (re-scoring rows
with a reward whose statistics must not update). docs/architecture.md, "Train and eval modes"."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Every submodule of `modules` (None skipped) in eval mode for the block; each gets its own mode back after it
    (so a frozen network inside a module in train mode stays in eval mode). Gradients still flow: this only freezes
    mode-dependent state (dropout, batch-norm or a normalising composite reward's running statistics)."""
    present = [m for m in modules if m is not None]
    saved = [(sub, sub.training) for module in present for sub in module.modules()]
    for module in present:
        module.eval()
    try:
        yield
    finally:
        for sub, training in saved:
            sub.training = training
