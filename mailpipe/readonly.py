"""Open a SQLite database for reading only: never creating, migrating or changing it.

``status``, ``search`` and ``show`` read databases that ``mailpipe run`` writes (the
journal, the ``store.sqlite`` archive). :func:`connect_read_only` opens them with
``mode=ro``, so SQLite's WAL protocol lets them read while a writer works. A reader
of a WAL database needs the ``-shm`` index; SQLite creates it (and an empty ``-wal``)
when the folder is writable, and refuses otherwise ("attempt to write a readonly
database"). When there is no ``-wal`` file (nobody has the database open: SQLite
removes both files when the last connection closes it cleanly), the database is
opened ``immutable=1`` instead, which needs neither file and creates none. So a
reader never leaves files behind: they would belong to the reading user, and a
worker running as another user could then not open the database for writing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mailpipe.errors import MailpipeError


class ReadOnlyOpenError(MailpipeError):
    """The database cannot be read without writing; the message says why."""


def connect_read_only(path: Path) -> sqlite3.Connection:
    """Return a read-only connection to the existing database at ``path``.

    The caller checks that ``path`` exists (``mode=ro`` never creates it either).
    A probe query runs before returning, since SQLite reports a missing ``-shm`` only
    at the first read.

    :raises ReadOnlyOpenError: not readable, not a database, or a ``-wal`` file holds
        changes while the ``-shm`` index cannot be created (a read-only folder beside
        a database another process has open, or one that was not closed cleanly).
    """
    base = path.resolve().as_uri()
    wal = path.with_name(path.name + "-wal")
    if wal.exists():  # open elsewhere, or not closed cleanly: the WAL protocol
        try:
            return _probe(
                sqlite3.connect(f"{base}?mode=ro", uri=True, check_same_thread=False)
            )
        except sqlite3.Error as exc:
            if wal.exists() and wal.stat().st_size > 0:
                raise ReadOnlyOpenError(
                    f"cannot read {path}: {exc} ({wal.name} holds changes not yet in "
                    f"the database, and its -shm index cannot be created in "
                    f"{path.parent})"
                ) from exc
    # Nobody has it open: immutable=1 reads the file alone and creates nothing.
    try:
        return _probe(
            sqlite3.connect(
                f"{base}?mode=ro&immutable=1", uri=True, check_same_thread=False
            )
        )
    except sqlite3.Error as exc:
        raise ReadOnlyOpenError(f"cannot read {path}: {exc}") from exc


def _probe(conn: sqlite3.Connection) -> sqlite3.Connection:
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn
