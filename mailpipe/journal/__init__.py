"""The journal: per-message delivery state that makes re-fetching harmless."""

from __future__ import annotations

from pathlib import Path

from mailpipe.journal.base import (
    Entry,
    Fence,
    Finish,
    Journal,
    Lease,
    PollRecord,
    Status,
)
from mailpipe.journal.errors import (
    FencedError,
    JournalError,
    JournalMissingError,
    SchemaOutdatedError,
    SchemaVersionError,
)

__all__ = [
    "Entry",
    "Fence",
    "FencedError",
    "Finish",
    "Journal",
    "JournalError",
    "JournalMissingError",
    "Lease",
    "PollRecord",
    "SchemaOutdatedError",
    "SchemaVersionError",
    "Status",
    "open_journal",
]

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_journal(
    url_or_path: str, *, base_dir: Path, read_only: bool = False
) -> Journal:
    """Open the journal that ``url_or_path`` names (``read_only``: see the backends).

    ``postgresql://…`` (or ``postgres://…``) opens a :class:`PostgresJournal` (an
    optional ``schema=NAME`` query parameter selects the PostgreSQL schema); anything
    else is a SQLite file path, resolved against ``base_dir`` unless absolute (``~``
    expanded).
    """
    if url_or_path.startswith(_POSTGRES_SCHEMES):
        from mailpipe.journal.postgres import PostgresJournal

        return PostgresJournal.from_url(url_or_path, read_only=read_only)
    from mailpipe.journal.sqlite import SqliteJournal

    if url_or_path == ":memory:":
        return SqliteJournal(url_or_path)
    path = Path(url_or_path).expanduser()
    return SqliteJournal(
        path if path.is_absolute() else base_dir / path, read_only=read_only
    )
