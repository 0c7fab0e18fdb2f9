"""Collects source and processor classes from the registration hooks."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pluggy
from pydantic import BaseModel

from mailpipe.errors import PluginError

Kind = Literal["source", "processor"]


class Register(Protocol):
    """What registration hooks receive: two ways to register a class.

    ``register(cls)`` registers a class already imported. ``register.lazy(name,
    "package.module:Class")`` is the public lazy-registration helper: it registers
    ``name`` now and imports the module only when a configuration uses ``name`` (the
    class is checked then, and its ``name`` must match). Every built-in plugin
    registers this way, so starting mailpipe imports only what its configuration uses.
    """

    def __call__(self, cls: type[Any], /) -> None:
        """Register ``cls`` (checked now); a bad class or a taken name is a
        :class:`~mailpipe.errors.PluginError`."""

    def lazy(self, name: str, target: str) -> None:
        """Register ``name`` as ``"package.module:Class"``, imported on first use; a
        taken name is a :class:`~mailpipe.errors.PluginError` now, a broken target
        one when the class is first needed."""


class Entry:
    """One registered class: its kind, name, class and the plugin that registered it.

    A lazy entry imports and checks its class on first access to :attr:`cls`; a broken
    target is a :class:`PluginError` naming the plugin.
    """

    __slots__ = ("_cls", "kind", "name", "plugin", "target")

    def __init__(
        self,
        kind: Kind,
        name: str,
        cls: type[Any] | None,
        plugin: str,
        target: str | None = None,
    ) -> None:
        self.kind, self.name, self.plugin, self.target = kind, name, plugin, target
        self._cls = cls

    @property
    def cls(self) -> type[Any]:
        """The class (imported now if it was registered lazily)."""
        if self._cls is None:
            assert self.target is not None
            module, _, attr = self.target.partition(":")
            try:
                cls = getattr(importlib.import_module(module), attr)
            except Exception as exc:
                raise PluginError(
                    f"plugin {self.plugin!r}: {self.kind} {self.name!r} cannot be "
                    f"loaded from {self.target!r}: {type(exc).__name__}: {exc}"
                ) from exc
            _check(self.kind, cls, self.plugin)
            if cls.name != self.name:
                raise PluginError(
                    f"plugin {self.plugin!r} registered {self.kind} {self.name!r} as "
                    f"{self.target!r}, whose name is {cls.name!r}"
                )
            self._cls = cls
        return self._cls

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return (self.kind, self.name, self.cls, self.plugin) == (
            other.kind, other.name, other.cls, other.plugin
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        what = self._cls.__qualname__ if self._cls is not None else f"lazy {self.target}"
        return f"Entry({self.kind!r}, {self.name!r}, {what}, {self.plugin!r})"


def _check(kind: Kind, cls: type[Any], plugin: str) -> str:
    """Return ``cls.name`` after checking the contract; a PluginError otherwise."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin {plugin!r} registered {cls!r} without a string `name`")
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        raise PluginError(
            f"plugin {plugin!r}: {kind} {name!r} needs an `Options` pydantic model"
        )
    method = "process" if kind == "processor" else "session"
    if not callable(getattr(cls, method, None)):
        raise PluginError(f"plugin {plugin!r}: {kind} {name!r} has no `{method}()`")
    nowait = getattr(cls, "process_nowait", None) if kind == "processor" else None
    if inspect.iscoroutinefunction(nowait) or inspect.isasyncgenfunction(nowait):
        # Refused here, not only when the chain is built, so that `mailpipe check`
        # reports it (review of h-lows; the chain still checks each instance's own).
        raise PluginError(
            f"plugin {plugin!r}: {kind} {name!r}: process_nowait must be a synchronous "
            "method (see mailpipe.Processor); work that awaits belongs in process()"
        )
    requires = getattr(cls, "requires", ())
    if not (
        isinstance(requires, tuple)
        and all(isinstance(n, str) and n for n in requires)
    ):
        # mailpipe.prerequisites reads it: a tuple of `use` names, e.g. ("parse",).
        raise PluginError(
            f"plugin {plugin!r}: {kind} {name!r}: `requires` must be a tuple of "
            f"processor names, e.g. ('parse',); got {requires!r}"
        )
    return name


@dataclass
class Registry:
    """Every source and processor class known to one plugin manager, by name."""

    sources: dict[str, Entry] = field(default_factory=dict)
    processors: dict[str, Entry] = field(default_factory=dict)

    def add(self, kind: Kind, cls: type[Any], plugin: str) -> None:
        """Register ``cls`` for ``plugin``; a bad class or a name clash is a PluginError."""
        name = _check(kind, cls, plugin)
        self._put(Entry(kind, name, cls, plugin))

    def add_lazy(self, kind: Kind, name: str, target: str, plugin: str) -> None:
        """Register ``name`` as ``"package.module:Class"``, imported on first use."""
        if not name or ":" not in target:
            raise PluginError(
                f"plugin {plugin!r}: lazy {kind} {name!r} needs a 'module:Class' target"
            )
        self._put(Entry(kind, name, None, plugin, target))

    def _put(self, entry: Entry) -> None:
        table = self.processors if entry.kind == "processor" else self.sources
        if entry.name in table:
            raise PluginError(
                f"plugin {entry.plugin!r} registers {entry.kind} {entry.name!r}, "
                f"already registered by plugin {table[entry.name].plugin!r}"
            )
        table[entry.name] = entry

    def processor(self, name: str) -> type[Any]:
        """Return the processor class called ``name`` (KeyError when unknown)."""
        return self.processors[name].cls

    def source(self, name: str) -> type[Any]:
        """Return the source class called ``name`` (KeyError when unknown)."""
        return self.sources[name].cls


class _Registrar:
    """The ``register`` callable given to one plugin's registration hook."""

    def __init__(self, registry: Registry, kind: Kind, plugin: str) -> None:
        self._registry, self._kind, self._plugin = registry, kind, plugin

    def __call__(self, cls: type[Any], /) -> None:
        self._registry.add(self._kind, cls, self._plugin)

    def lazy(self, name: str, target: str) -> None:
        self._registry.add_lazy(self._kind, name, target, self._plugin)


def lazy_exports(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) importing ``package.<table[name]>`` on first
    use of ``name``: a plugin package can re-export its API without import cost."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(f"{package}.{table[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


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

            try:
                impl.function(register=_Registrar(registry, kind, plugin))
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {plugin!r} failed in {caller.name}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
    return registry
