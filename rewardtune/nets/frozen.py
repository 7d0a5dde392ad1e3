"""Frozen weights kept out of checkpoints: a component built around a large frozen network (CLIP, a classifier, a
VAE, a pretrained UNet under LoRA) stores only what trains; its factory rebuilds the rest from the source.

- `keep_out_of_checkpoints(module, child)`: a whole frozen submodule.
- `keep_frozen_parameters_out_of_checkpoints(module, child)`: the parameters of `module.<child>` that do not
  require gradients (the base weights under LoRA adapters), and optionally its constant buffers; the trainable
  ones (the adapters) stay.

Loading a state dict without those keys, strictly, keeps the weights the module already holds, so `--resume` works.
"""

from __future__ import annotations

from torch import nn


def keep_out_of_checkpoints(module: nn.Module, child: str) -> None:
    """Leave the frozen submodule `module.<child>` out of `module.state_dict()`.

    Loading (strictly) a state dict without those keys keeps the weights the module already holds, so a checkpoint
    of a reward around a frozen network (CLIP, a classifier) stores only what changes, and resuming still works:
    the factory rebuilds the frozen network from its source.
    """
    if not isinstance(getattr(module, child, None), nn.Module):
        raise TypeError(f"{type(module).__name__} has no submodule {child!r}")

    def drop(mod: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        for key in [k for k in state_dict if k.startswith(f"{prefix}{child}.")]:
            del state_dict[key]

    def restore(mod: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        for key, value in getattr(mod, child).state_dict(prefix=f"{prefix}{child}.", keep_vars=True).items():
            state_dict.setdefault(key, value.detach())

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_pre_hook(restore)


def keep_frozen_parameters_out_of_checkpoints(module: nn.Module, child: str, *, buffers: bool = False) -> None:
    """Leave the parameters of `module.<child>` that do not require gradients (at save time) out of
    `module.state_dict()`, and with `buffers` its buffers too (for constants the factory rebuilds, such as SD3's
    positional table, 226 MB at SD3's size); trainable parameters stay. Loading strictly without them keeps the
    held ones."""
    if not isinstance(getattr(module, child, None), nn.Module):
        raise TypeError(f"{type(module).__name__} has no submodule {child!r}")

    def frozen_keys(mod: nn.Module, prefix: str) -> dict[str, object]:
        net = getattr(mod, child)
        keys = {f"{prefix}{child}.{name}": p for name, p in net.named_parameters() if not p.requires_grad}
        if buffers:
            keys |= {f"{prefix}{child}.{name}": b for name, b in net.named_buffers()}
        return keys

    def drop(mod: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        for key in frozen_keys(mod, prefix):
            state_dict.pop(key, None)

    def restore(mod: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        for key, value in frozen_keys(mod, prefix).items():
            state_dict.setdefault(key, value.detach())

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_pre_hook(restore)
