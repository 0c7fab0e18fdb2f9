"""Builds a fresh plugin manager: built-ins and entry points through the same door."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import pluggy

from mailpipe import hookspecs
from mailpipe.errors import PluginError
from mailpipe.registry import Registry, collect

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

#: Built-in plugins: (plugin name, module). Registered exactly like entry points.
BUILTIN_PLUGINS: Final = (
    ("pop3", "mailpipe.plugins.pop3"),
    ("imap", "mailpipe.plugins.imap"),
    ("parse", "mailpipe.plugins.parse"),
    ("filter", "mailpipe.plugins.filter"),
    ("store", "mailpipe.plugins.store"),
    ("forward", "mailpipe.plugins.forward"),
    ("reply", "mailpipe.plugins.reply"),
    ("ticket", "mailpipe.plugins.ticket"),
    ("bounce", "mailpipe.plugins.bounce"),
    ("loopguard", "mailpipe.plugins.loopguard"),
    ("unwrap", "mailpipe.plugins.unwrap"),
    ("extract", "mailpipe.plugins.extract"),
)

#: Entry-point group third-party plugins declare.
ENTRY_POINT_GROUP: Final = "mailpipe"

#: Comma-separated plugin names to block, like ``[plugins] disable``.
DISABLE_ENV: Final = "MAILPIPE_DISABLE_PLUGINS"


def blocked_from_env() -> list[str]:
    """Return the plugin names listed in ``MAILPIPE_DISABLE_PLUGINS``."""
    raw = os.environ.get(DISABLE_ENV, "")
    return [n.strip() for n in raw.split(",") if n.strip()]


def get_plugin_manager(
    *, entry_points: bool = True, blocked: Iterable[str] = ()
) -> pluggy.PluginManager:
    """Return a new plugin manager with built-ins and (optionally) entry-point plugins.

    Blocked names come from ``blocked`` and ``MAILPIPE_DISABLE_PLUGINS``. An import
    failure or a misspelled ``mailpipe_*`` hook implementation raises
    :class:`~mailpipe.errors.PluginError` naming the plugin.
    """
    pm = pluggy.PluginManager("mailpipe")
    pm.add_hookspecs(hookspecs)
    for name in [*blocked, *blocked_from_env()]:
        pm.set_blocked(name)
    for name, dotted in BUILTIN_PLUGINS:
        if pm.is_blocked(name):
            continue
        try:
            module = importlib.import_module(dotted)
        except Exception as exc:
            raise PluginError(f'error importing plugin "{name}": {exc}') from exc
        pm.register(module, name)
    if entry_points:
        _load_entry_points(pm)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or "?"
        raise PluginError(f'plugin "{name}": {exc}') from exc
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register every entry point of :data:`ENTRY_POINT_GROUP` that is not blocked.

    Each is imported here first, so that an import failure names its plugin; pluggy's
    own loader then registers it and records its distribution, which
    :func:`describe` reads back with ``pm.list_plugin_distinfo()`` (nothing global).
    """
    for ep in _declared_entry_points():
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            ep.load()
        except Exception as exc:
            raise PluginError(f'error importing plugin "{ep.name}": {exc}') from exc
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f'plugin "{ep.name}": {exc}') from exc


def _declared_entry_points() -> list[EntryPoint]:
    """The entry points of :data:`ENTRY_POINT_GROUP`, as ``importlib.metadata`` lists
    them.

    Most installations declare none, and ``entry_points(group=...)`` parses the
    ``entry_points.txt`` of every installed distribution (~3 ms of each start with a
    hundred of them, issue 18). So the files are first searched for ``[mailpipe]``,
    which every header of the group contains (``importlib.metadata`` takes a stripped
    line ``[...]`` whose name without brackets is the group); only if one has it
    are they parsed.
    """
    from importlib.metadata import distributions, entry_points

    header = f"[{ENTRY_POINT_GROUP}]"
    if not any(header in (d.read_text("entry_points.txt") or "") for d in distributions()):
        return []
    return list(entry_points(group=ENTRY_POINT_GROUP))


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """What ``mailpipe plugins`` shows for one plugin."""

    name: str
    origin: str
    version: str
    sources: tuple[str, ...]
    processors: tuple[str, ...]


def describe(pm: pluggy.PluginManager, registry: Registry) -> list[PluginInfo]:
    """List every registered plugin with its origin, version and registered names.

    The origin is ``builtin``; or, for a plugin loaded from an entry point, its
    distribution's name and version as pluggy recorded them for ``pm``
    (``pm.list_plugin_distinfo()``); or ``registered`` (version ``?``) for a plugin
    that code registered on ``pm`` directly.
    """
    from mailpipe import __version__

    builtin = {n for n, _ in BUILTIN_PLUGINS}
    dists = {
        pm.get_name(plugin): (dist.project_name, dist.version)
        for plugin, dist in pm.list_plugin_distinfo()
    }
    out = []
    for name, _plugin in pm.list_name_plugin():
        if name in builtin:
            origin, version = "builtin", __version__
        else:
            # Registered from an entry point: its distribution; else by code.
            origin, version = dists.get(name, ("registered", "?"))
        out.append(
            PluginInfo(
                name=name,
                origin=origin,
                version=version,
                sources=tuple(
                    sorted(
                        e.name for e in registry.sources.values() if e.plugin == name
                    )
                ),
                processors=tuple(
                    sorted(
                        e.name for e in registry.processors.values() if e.plugin == name
                    )
                ),
            )
        )
    return out


class Hooks:
    """Typed facade over the event hooks; exceptions from implementations are logged.

    When each hook fires is documented on its specification (:mod:`mailpipe.hookspecs`).
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm

    def _call(self, hook: str, **kwargs: Any) -> None:
        import structlog

        try:
            getattr(self._pm.hook, hook)(**kwargs)
        except Exception as exc:  # event hooks must not break delivery
            structlog.get_logger().warning(
                "hook_failed", hook=hook, error=f"{type(exc).__name__}: {exc}"
            )

    def session_started(self, *, mailbox: str, count: int, octets: int) -> None:
        """Announce a commit window's listing (``mailpipe_session_started``)."""
        self._call(
            "mailpipe_session_started", mailbox=mailbox, count=count, octets=octets
        )

    def session_finished(self, *, mailbox: str, summary: dict[str, Any]) -> None:
        """Announce the end of a poll (``mailpipe_session_finished``)."""
        self._call("mailpipe_session_finished", mailbox=mailbox, summary=summary)

    def message_done(
        self, *, mailbox: str, uid: str, key: str, disposition: str
    ) -> None:
        """Announce a message whose outcome is durable (``mailpipe_message_done``)."""
        self._call(
            "mailpipe_message_done",
            mailbox=mailbox,
            uid=uid,
            key=key,
            disposition=disposition,
        )

    def message_failed(
        self,
        *,
        mailbox: str,
        uid: str,
        key: str,
        processor: str,
        error: str,
        attempts: int,
    ) -> None:
        """Announce a failed attempt (``mailpipe_message_failed``)."""
        self._call(
            "mailpipe_message_failed",
            mailbox=mailbox,
            uid=uid,
            key=key,
            processor=processor,
            error=error,
            attempts=attempts,
        )

    def message_quarantined(
        self, *, mailbox: str, uid: str, key: str, reason: str, path: str
    ) -> None:
        """Announce a quarantined message (``mailpipe_message_quarantined``)."""
        self._call(
            "mailpipe_message_quarantined",
            mailbox=mailbox,
            uid=uid,
            key=key,
            reason=reason,
            path=path,
        )


def load(
    *, entry_points: bool = True, blocked: Iterable[str] = ()
) -> tuple[pluggy.PluginManager, Registry]:
    """Build a plugin manager and collect its registry in one step."""
    pm = get_plugin_manager(entry_points=entry_points, blocked=blocked)
    return pm, collect(pm)
