"""`import_object("package.module:attribute")`: how plugins, networks and feature extractors are named by path
(`call_factory_path` also calls such a factory).

It sits at the bottom of the layers so that components (backbones, metrics) and the registry can both use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from rewardtune.errors import PluginError, PluginNotFoundError


def import_object(path: str, what: str) -> Callable:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise PluginNotFoundError(f"{what}: expected \"package.module:factory\", got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise PluginNotFoundError(f"{what}: cannot import module {module_name!r} ({err})") from None
    except Exception as err:  # noqa: BLE001 (a user module may raise anything on import)
        raise PluginError(f"{what}: importing {module_name!r} failed: {type(err).__name__}: {err}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PluginNotFoundError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None


def call_factory_path(path: str, what: str) -> object:
    """Import "package.module:factory" and call it with no arguments; whatever the user's factory raises becomes a
    one-line PluginError."""
    factory = import_object(path, what)
    try:
        return factory()
    except Exception as err:  # noqa: BLE001 (a user factory may raise anything)
        raise PluginError(f"{what}: calling {path!r} failed: {type(err).__name__}: {err}") from None
