"""`PluginTable`: a plugin table nested in another plugin's options (the terms of the `composite` reward).

The recipe validates a nested table exactly like a top-level one (`recipe.check_type`: `kind` resolved through the
registry, every other key an option of that factory or one of `extra_keys`) and stores the resolved factory; the
outer factory calls `build(context)`. The class sits below the components, so that a component can take nested
tables without importing the registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class PluginTable:
    """A validated nested plugin table. Subclasses set the class attributes.

    Class attributes:
        section: the registry `kind` is looked up in ("reward", ...).
        extra_keys: {key: type} the table takes besides the factory's options (e.g. a term's `weight`).
        extra_defaults: defaults of those keys.
    Fields:
        kind: the factory's name as written (a registered name, "package.module:factory" or an entry point).
        factory: the resolved factory.
        options: its validated options, defaults filled in (as `recipe.PluginSpec.options`).
        extra: the extra keys.
    """

    section: ClassVar[str] = ""
    extra_keys: ClassVar[dict[str, type]] = {}
    extra_defaults: ClassVar[dict[str, Any]] = {}
    kind: str
    factory: Callable = field(repr=False, compare=False)
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def context_names(self) -> list[str]:
        """The context parameters the factory asks for: its positional-only parameters, by name."""
        return [p.name for p in inspect.signature(self.factory).parameters.values() if p.kind is p.POSITIONAL_ONLY]

    def build(self, context: dict[str, Any]) -> Any:
        """Call the factory with the context parameters it asks for (positional-only, by name) and the options."""
        names = self.context_names()
        missing = [n for n in names if n not in context]
        if missing:
            raise ValueError(f"{self.section} {self.kind!r} asks for {missing[0]!r}, which is not available here")
        return self.factory(*[context[n] for n in names], **self.options)
