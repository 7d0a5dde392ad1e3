"""Plugin registries: names -> factories, for backbones, values, rewards, data and algorithms.

A name resolves, in order, to: a factory registered with the `register` decorator, a built-in (a lazy
"module:attribute" path, so heavy dependencies load only when chosen), a `"package.module:factory"` string, or an
installed entry point in the kind's group (`rewardtune.backbones`, `rewardtune.rewards`, ...), loaded on the first
miss. Registered names cannot reuse a built-in's; an entry point named like a built-in is shadowed by it.

Factories take their build context as positional-only parameters named from `CONTEXT_NAMES` (for example
`sample_shape` or `backbone`) and their recipe options as keyword-only parameters, or as one keyword-only `config`
parameter annotated with a dataclass whose fields are the options. An option annotated with a
`tables.PluginTable` subclass (or a list of one) takes nested plugin tables, which the recipe validates like
top-level ones (the terms of the `composite` reward).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points

from rewardtune.errors import PluginError, PluginNotFoundError
from rewardtune.imports import import_object

CONTEXT_NAMES = ("sample_shape", "num_steps", "backbone", "value", "reward", "teacher")  # teacher: [distill]


class Registry:
    """One kind of plugin. `get(name)` returns the factory; `names()` lists what is known."""

    def __init__(self, kind: str, group: str, builtins: dict[str, str]) -> None:
        self.kind, self.group = kind, group
        self._builtins = dict(builtins)
        self._registered: dict[str, Callable] = {}
        self._entry_points: dict[str, object] | None = None

    def register(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator: `@registry.register("my_reward")` on a factory."""
        if name != name.lower() or not name.replace("_", "").isalnum():
            raise ValueError(f"plugin names are lowercase snake_case, got {name!r}")

        def decorate(factory: Callable) -> Callable:
            if name in self._builtins or name in self._registered:
                other = self._registered.get(name) or self._builtins[name]
                raise ValueError(f"{self.kind} {name!r} is already registered ({other}); pick another name")
            self._registered[name] = factory
            return factory

        return decorate

    def _installed(self) -> dict[str, object]:
        if self._entry_points is None:
            self._entry_points = {ep.name: ep for ep in entry_points(group=self.group)}
        return self._entry_points

    def names(self) -> list[str]:
        return sorted({*self._builtins, *self._registered, *self._installed()})

    def source(self, name: str) -> str:
        if name in self._builtins:
            return "built-in"
        if name in self._registered:
            return "registered"
        return f"entry point {self._installed()[name].value}"

    def get(self, name: str) -> Callable:
        if name in self._registered:
            return self._registered[name]
        if name in self._builtins:
            return import_object(self._builtins[name], f"built-in {self.kind} {name!r}")
        if ":" in name:
            return import_object(name, f"{self.kind} {name!r}")
        installed = self._installed()
        if name in installed:
            try:
                return installed[name].load()
            except Exception as err:  # noqa: BLE001 (a third-party plugin may raise anything on import)
                raise PluginError(f"{self.kind} {name!r} (entry point {installed[name].value}) failed to load: {err}") from None
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PluginNotFoundError(
            f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known)}; or give \"package.module:factory\")"
        )


def context_parameters(factory: Callable) -> list[str]:
    """Names of the positional-only context parameters of a factory (all must be in CONTEXT_NAMES)."""
    names = [p.name for p in inspect.signature(factory).parameters.values() if p.kind is p.POSITIONAL_ONLY]
    unknown = [n for n in names if n not in CONTEXT_NAMES]
    if unknown:
        raise PluginError(f"factory {factory.__qualname__} asks for unknown context {unknown}; allowed: {CONTEXT_NAMES}")
    return names


BACKBONES = Registry(
    "backbone",
    "rewardtune.backbones",
    {"mlp": "rewardtune.backbones.mlp:build_mlp_backbone", "ddpm": "rewardtune.backbones.ddpm:build_ddpm_backbone",
     "edm": "rewardtune.backbones.edm:build_edm_backbone"},
)
VALUES = Registry(
    "value",
    "rewardtune.values",
    {"time_mlp": "rewardtune.nets.value:build_time_mlp_value", "resnet": "rewardtune.nets.resnet:build_resnet_value"},
)
REWARDS = Registry(
    "reward",
    "rewardtune.rewards",
    {
        "energy": "rewardtune.rewards.energy:build_energy_reward",
        "clip": "rewardtune.rewards.clip:build_clip_reward",
        "aesthetic": "rewardtune.rewards.aesthetic:build_aesthetic_reward",
        "composite": "rewardtune.rewards.composite:build_composite_reward",
        "teacher": "rewardtune.rewards.teacher:build_teacher_reward",
    },
)
ALGORITHMS = Registry(
    "algorithm",
    "rewardtune.algorithms",
    {
        "dxdp": "rewardtune.algorithms.dxdp:build_dxdp",
        "ddpm": "rewardtune.algorithms.ddpm:build_ddpm",
        "policy_gradient": "rewardtune.algorithms.policy_gradient:build_policy_gradient",
        "distill": "rewardtune.algorithms.distill:build_distill",
    },
)
DATA = Registry(
    "data",
    "rewardtune.data",
    {
        "8gaussians": "rewardtune.data.toy:build_eight_gaussians",
        "digits": "rewardtune.data.images:build_digits",
        "cifar10": "rewardtune.data.images:build_cifar10",
        "image_folder": "rewardtune.data.images:build_image_folder",
    },
)

REGISTRIES = {"backbone": BACKBONES, "value": VALUES, "reward": REWARDS, "algorithm": ALGORITHMS, "data": DATA}
