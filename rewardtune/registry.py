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

A factory may declare `checkpoint_replaces = {option: value}`: options whose work a checkpoint loaded over the built
object replaces (the autoencoder energy's `pretrain_steps`); resuming, eval and sample build with those values
(`build.checkpoint_replaced`).

Each kind has a contract (`Registry.check_built`): what its factories must return, checked on every object a
recipe builds, so that a factory returning None, a plain function or an object of another kind is a one-line
`PluginError` naming the table and kind, not a crash at first use.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points

from rewardtune.errors import PluginError, PluginNotFoundError
from rewardtune.imports import import_object

CONTEXT_NAMES = ("sample_shape", "num_steps", "backbone", "value", "reward", "teacher", "conditioning", "data", "reporter")
# teacher: [distill]; conditioning: what condition a conditional run's networks take ([conditions]; None otherwise);
# data: the [data] source (an energy pretrained on it, a prior that starts from it); reporter: the run's progress
# Reporter (start / advance / message / stop), for long work a factory does while the recipe is built


Contract = Callable[[object], str | None]  # what a built object lacks ("a Reward (...)"), or None when it fits


class Registry:
    """One kind of plugin. `get(name)` returns the factory; `names()` lists what is known; `check_built(obj, label)`
    enforces the kind's `contract` on what a factory returned."""

    def __init__(self, kind: str, group: str, builtins: dict[str, str], contract: Contract | None = None) -> None:
        self.kind, self.group = kind, group
        self.contract = contract
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


    def check_built(self, obj: object, label: str) -> None:
        """Raise PluginError when `obj`, built by the factory `label` names ("[reward] kind 'x'"), breaks the
        kind's contract."""
        wanted = self.contract(obj) if self.contract is not None else None
        if wanted is not None:
            raise PluginError(f"{label} returned {describe_object(obj)}, not {wanted}")


def describe_object(obj: object) -> str:
    """How an error names what a factory returned: "None", "the function mymod.f", "a MyThing"."""
    if obj is None:
        return "None"
    if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj):
        return f"the {'class' if inspect.isclass(obj) else 'function'} {obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__qualname__}"


def instance_of(path: str, wanted: str) -> Contract:
    """Contract: an instance of the class at "module:Class" (imported at the first check)."""

    def check(obj: object) -> str | None:
        return None if isinstance(obj, import_object(path, wanted)) else wanted

    return check


def has_members(*names: str, wanted: str, base: Contract | None = None) -> Contract:
    """Contract: `base`'s, then these attributes (the message names the missing ones)."""

    def check(obj: object) -> str | None:
        if base is not None and base(obj) is not None:
            return wanted
        missing = [n for n in names if not hasattr(obj, n)]
        if not missing:
            return None
        if obj is None or inspect.isfunction(obj):  # nothing like one: naming what it lacks would not help
            return wanted
        return f"{wanted}; it lacks {', '.join(missing)}"

    return check


def data_contract(obj: object) -> str | None:
    """Data: `sample(n, generator, device)` and `sample_shape`, a tuple of positive sizes (torch.Size is one)."""
    shape = getattr(obj, "sample_shape", None)
    sizes = isinstance(shape, (tuple, list)) and len(shape) > 0
    sizes = sizes and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    if callable(getattr(obj, "sample", None)) and sizes:
        return None
    return "a data source with sample(n, generator, device) and a sample_shape of positive sizes (docs/architecture.md)"


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
     "edm": "rewardtune.backbones.edm:build_edm_backbone", "flow": "rewardtune.backbones.flow:build_flow_backbone",
     "sd": "rewardtune.backbones.latent:build_sd_backbone", "sd3": "rewardtune.backbones.sd3:build_sd3_backbone",
     "flux": "rewardtune.backbones.flux:build_flux_backbone",
     "posterior_sampling": "rewardtune.backbones.posterior:build_posterior_sampling_backbone",
     "sphere_mlp": "rewardtune.backbones.sphere:build_sphere_mlp_backbone",
     "gmm": "rewardtune.backbones.gmm:build_gmm_backbone"},
    instance_of("rewardtune.backbones.base:GaussianChainPolicy", "a GaussianChainPolicy (rewardtune.backbones.base)"),
)
VALUES = Registry(
    "value",
    "rewardtune.values",
    {
        "time_mlp": "rewardtune.nets.value:build_time_mlp_value",
        "resnet": "rewardtune.nets.resnet:build_resnet_value",
        "features": "rewardtune.nets.feature_value:build_feature_value",
    },
    has_members(
        "optimizer", wanted="a value: a torch.nn.Module with its `optimizer` (nets/value.py: ValueFunction)",
        base=instance_of("torch.nn:Module", "a torch.nn.Module"),
    ),
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
        "shapes": "rewardtune.rewards.shapes:build_shapes_reward",
        "pickscore": "rewardtune.rewards.pickscore:build_pickscore_reward",
        "time_energy": "rewardtune.rewards.time_energy:build_time_energy_reward",
        "discriminator": "rewardtune.rewards.discriminator:build_discriminator_reward",
        "autoencoder": "rewardtune.rewards.autoencoder:build_autoencoder_reward",
    },
    instance_of("rewardtune.rewards.base:Reward", "a Reward (a subclass of rewardtune.rewards.base.Reward; docs/plugins.md)"),
)
ALGORITHMS = Registry(
    "algorithm",
    "rewardtune.algorithms",
    {
        "dxdp": "rewardtune.algorithms.dxdp:build_dxdp",
        "ddpm": "rewardtune.algorithms.ddpm:build_ddpm",
        "flow_matching": "rewardtune.algorithms.flow_matching:build_flow_matching",
        "policy_gradient": "rewardtune.algorithms.policy_gradient:build_policy_gradient",
        "distill": "rewardtune.algorithms.distill:build_distill",
        "ddaebm": "rewardtune.algorithms.ddaebm:build_ddaebm",
        "discriminator_guidance": "rewardtune.algorithms.discriminator_guidance:build_discriminator_guidance",
    },
    has_members(
        "needs_rollout", "update", "modules", "optimizers", "state_dict", "load_state_dict",
        wanted="an algorithm (needs_rollout, update, modules, optimizers, state_dict, load_state_dict; docs/architecture.md)",
    ),
)
DATA = Registry(
    "data",
    "rewardtune.data",
    {
        "8gaussians": "rewardtune.data.toy:build_eight_gaussians",
        "25gaussians": "rewardtune.data.toy:build_twenty_five_gaussians",
        "pinwheel": "rewardtune.data.toy:build_pinwheel",
        "swissroll": "rewardtune.data.toy:build_swiss_roll",
        "gmm": "rewardtune.data.toy:build_gaussian_mixture",
        "digits": "rewardtune.data.images:build_digits",
        "cifar10": "rewardtune.data.images:build_cifar10",
        "image_folder": "rewardtune.data.images:build_image_folder",
        "shapes": "rewardtune.data.shapes:build_shapes",
        "none": "rewardtune.data.none:build_no_data",
        "anomaly_features": "rewardtune.data.anomaly:build_anomaly_features",
    },
    data_contract,
)
PRIORS = Registry(
    "prior",
    "rewardtune.priors",
    {
        "standard_normal": "rewardtune.backbones.priors:build_standard_normal_prior",
        "noised_data": "rewardtune.backbones.priors:build_noised_data_prior",
    },
    has_members(
        "sample", wanted="a prior: a torch.nn.Module with sample(n, shape, generator, device) (backbones/priors.py)",
        base=instance_of("torch.nn:Module", "a torch.nn.Module"),
    ),
)

REGISTRIES = {
    "backbone": BACKBONES, "value": VALUES, "reward": REWARDS, "algorithm": ALGORITHMS, "data": DATA, "prior": PRIORS,
}
