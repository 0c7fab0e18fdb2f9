"""Wiring shared by the CLI commands: config, plugins, journal, chain, local files."""

from __future__ import annotations

import mailbox as stdlib_mailbox
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pluggy

from mailpipe.config import Config, read_toml, validate_config
from mailpipe.journal import open_journal
from mailpipe.journal.base import Journal
from mailpipe.message import Message
from mailpipe.plugin_manager import load
from mailpipe.prerequisites import check_prerequisites
from mailpipe.quarantine import Quarantine


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
    then check each step's prerequisites (:mod:`mailpipe.prerequisites`).

    :raises ConfigError: every problem at once (unmet prerequisites once the rest
        of the file is valid).
    :raises PluginError: a plugin failed to load.
    """
    path = Path(path)
    data = read_toml(path)
    disable: list[str] = []
    plugins = data.get("plugins")
    if isinstance(plugins, dict) and isinstance(plugins.get("disable"), list):
        disable = [str(x) for x in plugins["disable"]]
    pm, registry = load(entry_points=entry_points, blocked=disable)
    config = validate_config(data, path=path, registry=registry)
    check_prerequisites(config.pipelines, path=str(path))
    return App(config=config, pm=pm)


def iter_local_messages(paths: list[Path]) -> Iterator[Message]:
    """Yield messages from ``.eml`` files, directories of them, Maildirs and mbox files.

    Each message's mailbox is ``local`` and its uid is ``sha256:<hex>`` of its bytes,
    so re-running over the same files yields the same keys.
    """
    for path in paths:
        yield from _iter_path(path)


def _is_maildir(path: Path) -> bool:
    return all((path / sub).is_dir() for sub in ("cur", "new", "tmp"))


def _is_mbox(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(5) == b"From "
    except OSError:
        return False


def _iter_path(path: Path) -> Iterator[Message]:
    if path.is_dir():
        if _is_maildir(path):
            for sub in ("new", "cur"):
                for item in sorted((path / sub).iterdir()):
                    if item.is_file():
                        yield Message.from_bytes(item.read_bytes())
            return
        for item in sorted(path.rglob("*")):
            if item.is_file() and (item.suffix.lower() == ".eml" or _is_mbox(item)):
                yield from _iter_path(item)
        return
    if _is_mbox(path):
        box = stdlib_mailbox.mbox(path, create=False)
        try:
            for key in box.iterkeys():
                yield Message.from_bytes(box.get_bytes(key))
        finally:
            box.close()
        return
    yield Message.from_bytes(path.read_bytes())
