"""Finding the installed policies: pluggy loads every plugin of the entry-point group ``memos.policies``."""

from __future__ import annotations

import pluggy

from memos.errors import ConfigError

from .spec import GROUP, PROJECT, Policy, PolicyHooks


def plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(PolicyHooks)
    manager.load_setuptools_entrypoints(GROUP)
    return manager


def load_policies(manager: pluggy.PluginManager | None = None) -> dict[str, type[Policy]]:
    """Every installed policy class by name; two with one name is a configuration error."""
    manager = manager or plugin_manager()
    found: dict[str, type[Policy]] = {}
    for provided in manager.hook.memos_policies():
        for cls in provided:
            if not (isinstance(cls, type) and issubclass(cls, Policy)):
                raise ConfigError(f"a policy plugin returned {cls!r}, not a Policy class")
            if cls.name in found and found[cls.name] is not cls:
                raise ConfigError(f"two policies are named {cls.name!r}")
            found[cls.name] = cls
    return dict(sorted(found.items()))
