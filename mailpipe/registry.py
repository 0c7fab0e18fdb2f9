"""Collects source and processor classes from the registration hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy
from pydantic import BaseModel

from mailpipe.errors import PluginError

Register = Callable[[type[Any]], None]
Kind = Literal["source", "processor"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One registered class: its kind, name, class and the plugin that registered it."""

    kind: Kind
    name: str
    cls: type[Any]
    plugin: str


@dataclass
class Registry:
    """Every source and processor class known to one plugin manager, by name."""

    sources: dict[str, Entry] = field(default_factory=dict)
    processors: dict[str, Entry] = field(default_factory=dict)

    def add(self, kind: Kind, cls: type[Any], plugin: str) -> None:
        """Register ``cls`` for ``plugin``; a bad class or a name clash is a PluginError."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(
                f"plugin {plugin!r} registered {cls!r} without a string `name`"
            )
        options = getattr(cls, "Options", None)
        if not (isinstance(options, type) and issubclass(options, BaseModel)):
            raise PluginError(
                f"plugin {plugin!r}: {kind} {name!r} needs an `Options` pydantic model"
            )
        method = "process" if kind == "processor" else "session"
        if not callable(getattr(cls, method, None)):
            raise PluginError(f"plugin {plugin!r}: {kind} {name!r} has no `{method}()`")
        table = self.processors if kind == "processor" else self.sources
        if name in table:
            raise PluginError(
                f"plugin {plugin!r} registers {kind} {name!r}, "
                f"already registered by plugin {table[name].plugin!r}"
            )
        table[name] = Entry(kind, name, cls, plugin)

    def processor(self, name: str) -> type[Any]:
        """Return the processor class called ``name`` (KeyError when unknown)."""
        return self.processors[name].cls

    def source(self, name: str) -> type[Any]:
        """Return the source class called ``name`` (KeyError when unknown)."""
        return self.sources[name].cls


def register_modules(register: Register, package: str, modules: tuple[str, ...]) -> None:
    """Register the ``PROCESSORS`` of each module ``package.NAME`` (a plugin package's
    submodules, e.g. ``store.sqlite``); an import error names the module."""
    import importlib

    for name in modules:
        module = importlib.import_module(f"{package}.{name}")
        for cls in module.PROCESSORS:
            register(cls)


def collect(pm: pluggy.PluginManager) -> Registry:
    """Call each plugin's registration hooks one by one, so clashes name both plugins."""
    registry = Registry()
    calls: list[tuple[Kind, Any]] = [
        ("source", pm.hook.mailpipe_register_sources),
        ("processor", pm.hook.mailpipe_register_processors),
    ]
    for kind, caller in calls:
        for impl in caller.get_hookimpls():  # registration order (pluggy calls LIFO)
            plugin = impl.plugin_name

            def register(cls: type[Any], _k: Kind = kind, _p: str = plugin) -> None:
                registry.add(_k, cls, _p)

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {plugin!r} failed in {caller.name}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
    return registry
