"""Reward `aesthetic`: the LAION improved aesthetic predictor (C. Schuhmann, github.com/christophschuhmann/
improved-aesthetic-predictor), as used for reward fine-tuning in DDPO (Black et al., 2023).

    r(x) = MLP(e / ||e||),   e = CLIP ViT-L/14 image embedding of x (OpenAI weights, 768-d)

The head is the repository's MLP, Linear(768, 1024) - Dropout(0.2) - Linear(1024, 128) - Dropout(0.2) -
Linear(128, 64) - Dropout(0.1) - Linear(64, 16) - Linear(16, 1), without activations (the published
sac+logos+ava1-l14-linearMSE weights; its state-dict keys are `layers.{0,2,4,6,7}.*`). Scores are roughly 1-10.
The image side is `clip.ClipImageEncoder` (differentiable torch preprocessing), so the reward is differentiable.

`head` is a local file (safetensors, or a torch state dict loaded with weights_only=True) or a URL, downloaded once
into $REWARDTUNE_CACHE/aesthetic. Offline, a download is a one-line `PluginError`. The CLIP model can be swapped
(a "local-dir:" folder, for instance); the head's input size follows the model's embedding size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlparse

import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.errors import PluginError
from rewardtune.quiet import quiet_libraries
from rewardtune.rewards.base import Reward, keep_out_of_checkpoints
from rewardtune.rewards.clip import ClipImageEncoder, check_image_shape, load_open_clip

DEFAULT_HEAD = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP: unit-norm embeddings [B, E] -> scores [B, 1]."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def head_cache_dir() -> Path:
    from rewardtune.nets.cache import cache_dir

    return cache_dir() / "aesthetic"


def fetch_head(source: str) -> Path:
    """A local path for `source` (a path, or a URL downloaded once into the cache)."""
    if not source.startswith(("http://", "https://")):
        path = Path(source).expanduser()
        if not path.is_file():
            raise PluginError(f"aesthetic: head weights {source} do not exist")
        return path
    path = head_cache_dir() / (unquote(Path(urlparse(source).path).name) or "head.pth")
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # this process's own: parallel first uses do not collide
    try:
        with quiet_libraries():
            torch.hub.download_url_to_file(source, str(tmp), progress=False)
    except Exception as err:  # noqa: BLE001 (URLError, HTTPError, timeouts)
        tmp.unlink(missing_ok=True)
        raise PluginError(
            f"aesthetic: cannot download the head weights from {source} ({type(err).__name__}); offline, copy the "
            f"file here and set head = \"/path/to/{path.name}\""
        ) from None
    os.replace(tmp, path)
    return path


def load_head(source: str, embed_dim: int) -> AestheticHead:
    """The MLP head with the weights of `source` (frozen, eval mode)."""
    path = fetch_head(source)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (corrupt or foreign weight files)
        raise PluginError(f"aesthetic: cannot read head weights {path} ({type(err).__name__}: {str(err)[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
        state = state["state_dict"]
    head = AestheticHead(embed_dim)
    try:
        head.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        lines = str(err).strip().splitlines()
        reason = lines[-1].strip() if lines else type(err).__name__
        raise PluginError(
            f"aesthetic: head weights {path} do not fit the MLP on {embed_dim}-d CLIP embeddings ({reason[:200]})"
        ) from None
    return head.eval().requires_grad_(False)


class AestheticReward(Reward):
    """r(x) = head(normalise(CLIP image embedding of x)): [B].

    Args:
        encoder: the CLIP image side (`ClipImageEncoder`).
        head: the MLP on unit-norm embeddings.
    """

    name: ClassVar[str] = "aesthetic"
    differentiable: ClassVar[bool] = True
    learns: ClassVar[bool] = False

    def __init__(self, encoder: ClipImageEncoder, head: AestheticHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        keep_out_of_checkpoints(self, "encoder")
        keep_out_of_checkpoints(self, "head")

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        embeddings = F.normalize(self.encoder(x).float(), dim=-1)  # [B, E]
        return self.head(embeddings).view(-1)


def build_aesthetic_reward(
    sample_shape: tuple[int, ...],
    /,
    *,
    head: str = DEFAULT_HEAD,
    model: str = "ViT-L-14",
    pretrained: str = "openai",
    cache_dir: str = "",
) -> AestheticReward:
    """Reward `aesthetic`: the LAION aesthetic MLP `head` (path or URL) on CLIP `model`/`pretrained` embeddings.

    The published head was trained on OpenAI ViT-L/14 embeddings; another model needs a head trained on its own.
    """
    check_image_shape(sample_shape, "aesthetic")
    net, _ = load_open_clip(model, pretrained, cache_dir=cache_dir, who="aesthetic")
    encoder = ClipImageEncoder(net)
    return AestheticReward(encoder, load_head(head, encoder.embed_dim))
