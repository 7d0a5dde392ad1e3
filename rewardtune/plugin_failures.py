"""Naming the plugin behind a failure: an exception raised in a plugin's own code becomes a one-line `PluginError`.

rewardtune calls plugin code when it builds a recipe (the factories) and while it trains, evaluates and samples
(`forward`, `cost`, `update`, `evaluation_metrics`, `sample`, ...). When such a call raises something other than a
`RewardtuneError`, `PluginOwners.failure` walks the exception's traceback from the innermost frame outwards to the
first frame that runs a plugin's code: code of a package other than rewardtune that supplied a factory, a nested
table's factory, or the class of a built object. The exception then becomes a `PluginError` that names the plugin
(its recipe table and kind), when it failed ("at step 12", "in the evaluation at step 0") and the original type and
first line; the original stays chained as its cause, so `--debug` shows its traceback. An exception that no
plugin's code raised is rewardtune's own (or torch's, called by rewardtune) and is left alone: an internal error.

A `PluginError` that rewardtune raised about a plugin (a reward returning the wrong shape) gets the same "when".
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rewardtune.errors import PluginError, RewardtuneError

OWN_PACKAGE = "rewardtune"


@dataclass(frozen=True)
class PluginOwner:
    package: str  # the top-level package of the plugin's code ("my_rewards", "rewardtune_jpeg", "__main__")
    label: str  # how errors name the plugin: "[reward] kind 'my_rewards:build'"


class PluginOwners:
    """The plugin packages of one experiment, each with the label its failures carry."""

    def __init__(self) -> None:
        self.owners: list[PluginOwner] = []

    def add(self, module: str, label: str) -> None:
        """Attribute code of `module`'s top-level package to `label` (rewardtune's own code and packages already
        attributed are skipped: the first plugin to name a package keeps it)."""
        package = (module or "").partition(".")[0]
        if package and package != OWN_PACKAGE and all(o.package != package for o in self.owners):
            self.owners.append(PluginOwner(package, label))

    def add_code_of(self, obj: object, label: str) -> None:
        """Attribute the package that defines `obj` (a factory) or, for an instance, its class."""
        module = getattr(obj, "__module__", None) if callable(obj) and hasattr(obj, "__qualname__") else None
        self.add(module or type(obj).__module__, label)

    @classmethod
    def of_objects(cls, objects: dict[str, object]) -> PluginOwners:
        """Owners from built objects alone ({table: object}, for a Trainer built without a recipe): each is named
        by its table and class, e.g. "[reward] my_rewards.Brightness"."""
        owners = cls()
        for table, obj in objects.items():
            if obj is not None:
                owners.add_code_of(obj, f"[{table}] {type(obj).__module__}.{type(obj).__qualname__}")
        return owners

    def owner_of(self, err: BaseException) -> PluginOwner | None:
        """The plugin whose code is innermost in `err`'s traceback, or None."""
        by_package = {o.package: o for o in self.owners}
        for frame, _ in reversed(list(traceback.walk_tb(err.__traceback__))):
            owner = by_package.get(str(frame.f_globals.get("__name__", "")).partition(".")[0])
            if owner is not None:
                return owner
        return None

    def failure(self, err: Exception, when: str, consequence: str = "") -> PluginError | None:
        """The PluginError to raise for `err`, raised `when` ("at step 12"), or None when no plugin's code raised it
        (nor is it a PluginError). `consequence` ends the message ("the last checkpoint is kept")."""
        tail = f"; {consequence}" if consequence else ""
        if isinstance(err, PluginError):
            return PluginError(f"{err} {when}{tail}")
        if isinstance(err, RewardtuneError):
            return None
        owner = self.owner_of(err)
        if owner is None:
            return None
        return PluginError(f"{owner.label} failed {when} ({type(err).__name__}: {first_line(err)}){tail}")

    @contextmanager
    def attributing(self, when: str, consequence: str = "") -> Iterator[None]:
        """Run a block that calls plugin code; a failure of a plugin is raised as `failure(...)`."""
        try:
            yield
        except Exception as err:
            failure = self.failure(err, when, consequence)
            if failure is None:
                raise
            raise failure from err


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), at most `limit` chars."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
