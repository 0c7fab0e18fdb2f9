"""The one way a config file is loaded: read, plugins chosen, validated, as an :class:`App`.

``run``, ``check``, ``process``, ``demo`` and every other command load through
:func:`open_app`: the file is read (:func:`mailpipe.config.read_toml`), the plugin
manager is built honouring ``[plugins] disable`` and ``MAILPIPE_DISABLE_PLUGINS``, and
the data is validated against the plugins it registered
(:func:`mailpipe.validation.validate_config`), then each step's prerequisites are
checked (:mod:`mailpipe.prerequisites`). :func:`load_config` is the same path
for callers that want only the :class:`~mailpipe.config.Config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from mailpipe.config import Config, read_toml
from mailpipe.journal import open_journal
from mailpipe.journal.base import Journal
from mailpipe.plugin_manager import load
from mailpipe.prerequisites import check_prerequisites
from mailpipe.quarantine import Quarantine
from mailpipe.registry import Registry
from mailpipe.validation import validate_config


@dataclass(slots=True)
class App:
    """A loaded config with its plugin manager."""

    config: Config
    pm: pluggy.PluginManager

    def journal(self, *, read_only: bool = False) -> Journal:
        """Open the journal named by ``[state] path`` (``read_only``: for ``status``)."""
        return open_journal(
            self.config.model.state.path,
            base_dir=self.config.base_dir,
            read_only=read_only,
        )

    def quarantine(self) -> Quarantine:
        """Open the quarantine directory."""
        return Quarantine(self.config.resolve(self.config.model.quarantine.dir))


def open_app(path: str | Path, *, entry_points: bool = True) -> App:
    """Load ``path``: plugins first (honouring ``[plugins] disable``), then validate,
    then check each step's prerequisites.

    :param entry_points: load third-party plugins declared as entry points too.
    :raises ConfigError: every problem at once, each naming its key path (unmet
        prerequisites once the rest of the file is valid).
    :raises PluginError: a plugin failed to load.
    """
    path = Path(path)
    data = read_toml(path)
    pm, registry = load(entry_points=entry_points, blocked=disabled_plugins(data))
    return App(config=_validated(data, path, registry), pm=pm)


def load_config(
    path: str | Path, *, registry: Registry | None = None, entry_points: bool = True
) -> Config:
    """Load ``path`` and validate it completely: the config of :func:`open_app`.

    :param registry: validate against these plugin classes instead of loading the
        plugins (tests and tools that bring their own).
    :raises ConfigError: every problem at once, each naming its key path.
    :raises PluginError: a plugin failed to load.
    """
    if registry is None:
        return open_app(path, entry_points=entry_points).config
    path = Path(path)
    return _validated(read_toml(path), path, registry)


def _validated(data: dict[str, Any], path: Path, registry: Registry) -> Config:
    config = validate_config(data, path=path, registry=registry)
    check_prerequisites(config.pipelines, path=str(path))
    return config


def disabled_plugins(data: dict[str, Any]) -> list[str]:
    """The plugin names of ``[plugins] disable`` in the raw TOML ``data``.

    Read before validation, which needs the plugins loaded; a malformed table blocks
    nothing here and is reported by validation.
    """
    plugins = data.get("plugins")
    if isinstance(plugins, dict) and isinstance(plugins.get("disable"), list):
        return [str(x) for x in plugins["disable"]]
    return []
