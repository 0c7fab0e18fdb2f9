"""The SQLite journal's schema: its migrations, and opening a journal read-only.

Contract: ``MIGRATIONS[N - 1]`` brings a database from version N - 1 to N and is never
edited once released (a change is a new migration); :data:`SCHEMA_VERSION` is the
version this code writes. :func:`migrate` applies the missing migrations inside the
caller's ``BEGIN IMMEDIATE`` transaction. :func:`open_read_only` opens an existing journal without
creating, migrating or changing anything, or raises.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

from mailpipe.journal.base import OAUTH_TOKENS_TABLE, apply_migrations, check_schema
from mailpipe.journal.errors import JournalError, JournalMissingError

#: Schema migrations; version N is reached by applying ``MIGRATIONS[N - 1]``.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE entries (
            mailbox     TEXT    NOT NULL,
            uid         TEXT    NOT NULL,
            key         TEXT    NOT NULL,
            status      TEXT    NOT NULL,
            attempts    INTEGER NOT NULL DEFAULT 0,
            size        INTEGER NOT NULL DEFAULT 0,
            sha256      TEXT,
            steps       TEXT    NOT NULL DEFAULT '[]',
            disposition TEXT,
            reason      TEXT    NOT NULL DEFAULT '',
            last_error  TEXT    NOT NULL DEFAULT '',
            delete_due  INTEGER NOT NULL DEFAULT 0,
            first_seen  REAL    NOT NULL,
            updated     REAL    NOT NULL,
            PRIMARY KEY (mailbox, uid)
        )
        """,
        "CREATE INDEX entries_status ON entries (mailbox, status, updated)",
        "CREATE INDEX entries_first_seen ON entries (first_seen)",
    ),
    (
        """
        CREATE TABLE polls (
            mailbox         TEXT    PRIMARY KEY,
            owner           TEXT    NOT NULL,
            first_polled    REAL    NOT NULL,
            polled_at       REAL    NOT NULL,
            last_success    REAL,
            last_error_at   REAL,
            last_error      TEXT    NOT NULL DEFAULT '',
            last_error_type TEXT    NOT NULL DEFAULT '',
            backlog         INTEGER,
            next_poll       REAL
        )
        """,
    ),
    # 3: the OAuth token cache (mailpipe.oauth.cache), shared by the workers.
    (OAUTH_TOKENS_TABLE.format(table="oauth_tokens", real="REAL"),),
    # 4: lease epochs (fencing tokens), raised by every take of a mailbox's lock.
    (
        """
        CREATE TABLE leases (
            mailbox TEXT    PRIMARY KEY,
            owner   TEXT    NOT NULL,
            epoch   INTEGER NOT NULL
        )
        """,
    ),
    # 5: listing cursors (a source's per-scope watermark, e.g. an IMAP folder's UID
    # under its UIDVALIDITY): see Journal.cursors.
    (
        """
        CREATE TABLE cursors (
            mailbox  TEXT    NOT NULL,
            scope    TEXT    NOT NULL,
            position INTEGER NOT NULL,
            PRIMARY KEY (mailbox, scope)
        )
        """,
        # The unfinished entries (PENDING or owed) every cursor poll reads.
        "CREATE INDEX entries_unfinished ON entries (mailbox) "
        "WHERE status = 'pending' OR delete_due = 1",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, *, where: str) -> int:
    """Bring the database to :data:`SCHEMA_VERSION` inside the caller's transaction;
    return the version found (``where`` names the journal in errors)."""
    return apply_migrations(
        conn.execute,
        table="schema_version",
        param="?",
        migrations=MIGRATIONS,
        where=where,
    )


def open_read_only(path: Path) -> sqlite3.Connection:
    """Open the journal at ``path`` read-only (``mailpipe status``): JournalMissingError
    when there is no file, SchemaOutdatedError or SchemaVersionError when its schema
    is not this code's, JournalError when it cannot be read."""
    from mailpipe.readonly import ReadOnlyOpenError, connect_read_only

    if not path.is_file():
        raise JournalMissingError(f"journal {path} does not exist")
    try:
        conn = connect_read_only(path)
    except ReadOnlyOpenError as exc:
        raise JournalError(f"journal: {exc}") from exc
    try:
        row = conn.execute("SELECT version FROM schema_version").fetchone()
    except sqlite3.OperationalError:  # no schema_version table
        row = None
    except sqlite3.Error as exc:
        conn.close()
        raise JournalError(f"journal {path}: {exc}") from exc
    try:
        check_schema(
            None if row is None else int(row[0]),
            latest=SCHEMA_VERSION,
            where=f"journal {path}",
        )
    except BaseException:
        conn.close()
        raise
    return conn
