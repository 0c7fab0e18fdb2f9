"""store.sqlite's schema: its tables, their migrations, and opening a database.

Schema (version :data:`SCHEMA_VERSION`, created and migrated on open; applied versions
are rows of ``schema_version``):

- ``messages``: one row per message key (``id`` is the stable rowid the index uses);
  record fields as columns, address lists as JSON arrays of ``{"name", "address"}``,
  ``addresses`` (every name and address, flattened for search), ``record`` (the whole
  ``mailpipe.message/1`` document of :func:`mailpipe.document.message_document`,
  with ``stored_at``, minus the bodies).
- ``message_raw``: (key → raw) the message bytes, one row per key when ``raw =
  "inline"``, none otherwise. ``raw`` is the last column of its row so that the
  ``zeroblob(size)`` a spooled message's bytes are inserted as stays a few bytes in
  the record; the bytes are then copied in 1 MiB pieces through incremental blob I/O,
  so storing a spooled message costs memory independent of its size (the bytes of a
  message held in memory are bound as they are: the same row). Read it with
  :func:`~mailpipe.plugins.store.sqlite.open_raw` (in pieces) or
  ``SELECT raw FROM message_raw WHERE key = ?`` (whole). Up to version 2 the bytes
  were ``messages.raw``; migration 3 moves them here (see :func:`_move_raw`).
- ``attachments``: (key, idx) → file name, type, size, sha256, … of each attachment.
- ``tags``: (key, tag) pairs from ``message.tags`` and the record's tags.
- ``messages_fts``: a contentless FTS5 index over ``subject``, ``addresses`` and
  ``body`` (the ``text`` column and, from version 4, ``attachment_text``: the
  attachments' text that the ``extract`` processor found), kept in step by triggers on
  insert, update and delete; from version 5 the insert trigger is off while the store
  itself writes (the one row of ``store_writing``, set and reset inside the store's
  write transaction, so no other connection sees it set), and the store indexes the
  rows it inserted in that transaction with one statement. Query it with
  :func:`~mailpipe.plugins.store.sqlite.search` or ``SELECT m.* FROM messages_fts
  JOIN messages m ON m.id = messages_fts.rowid WHERE messages_fts MATCH ?``.

Contract: :func:`connect` opens a database file in autocommit mode with the store's
pragmas, and :func:`migrate` brings it to :data:`SCHEMA_VERSION` (each version in one
transaction; a database newer than this code raises PermanentFailure);
:func:`classify` maps an sqlite3 error to TemporaryFailure or PermanentFailure. Nothing
here builds or writes a message's rows:
:class:`~mailpipe.plugins.store.sqlite.SqliteStore` prepares them (held as
:mod:`._sqlite_rows`' ``_Rows``) and writes them, indexing the rows it inserts with
:data:`_INDEX_UNINDEXED` (migration 5).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import structlog

from mailpipe.errors import MailpipeError, PermanentFailure, TemporaryFailure

from ._sqlite_writes import copy_into, open_connection

log = structlog.get_logger()

_ADDRESS_FIELDS: Final = (
    ("from_addresses", "from_addresses"),
    ("sender", "sender_addresses"),
    ("reply_to", "reply_to_addresses"),
    ("to", "to_addresses"),
    ("cc", "cc_addresses"),
    ("bcc", "bcc_addresses"),
)
_ADDRESS_COLUMNS: Final = tuple(col for _, col in _ADDRESS_FIELDS)

_V1: Final = (
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        mailbox TEXT NOT NULL,
        uid TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        parsed INTEGER NOT NULL,
        message_id TEXT,
        date TEXT,
        date_raw TEXT,
        """
    + "\n".join(f"{c} TEXT NOT NULL DEFAULT '[]'," for c in _ADDRESS_COLUMNS)
    + """
        subject TEXT,
        thread_key TEXT,
        list_id TEXT,
        auto_reply INTEGER NOT NULL DEFAULT 0,
        text TEXT,
        text_from_html INTEGER NOT NULL DEFAULT 0,
        html TEXT,
        record TEXT NOT NULL,
        raw BLOB,
        stored_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )""",
    "CREATE INDEX messages_message_id ON messages(message_id)",
    "CREATE INDEX messages_thread_key ON messages(thread_key)",
    "CREATE INDEX messages_date ON messages(date)",
    """CREATE TABLE attachments (
        key TEXT NOT NULL REFERENCES messages(key) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        filename TEXT,
        content_type TEXT NOT NULL,
        disposition TEXT,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        content_id TEXT,
        inline INTEGER NOT NULL DEFAULT 0,
        part TEXT,
        PRIMARY KEY (key, idx)
    ) WITHOUT ROWID""",
    "CREATE INDEX attachments_sha256 ON attachments(sha256)",
    """CREATE TABLE tags (
        key TEXT NOT NULL REFERENCES messages(key) ON DELETE CASCADE,
        tag TEXT NOT NULL,
        PRIMARY KEY (key, tag)
    ) WITHOUT ROWID""",
    "CREATE INDEX tags_tag ON tags(tag)",
)

_FTS_ROW: Final = "coalesce({p}.subject, ''), {p}.addresses, coalesce({p}.text, '')"
_JSON_NAMES: Final = " UNION ALL ".join(
    f"SELECT value FROM json_each(messages.{c})" for c in _ADDRESS_COLUMNS
)

_V2: Final = (
    "ALTER TABLE messages ADD COLUMN addresses TEXT NOT NULL DEFAULT ''",
    # Backfill with the same flattening as _flatten_addresses() (_sqlite_rows).
    f"""UPDATE messages SET addresses = coalesce((
        SELECT group_concat(trim(coalesce(json_extract(a.value, '$.name'), '') || ' ' ||
                                 coalesce(json_extract(a.value, '$.address'), '')), ' ')
        FROM ({_JSON_NAMES}) AS a), '')""",
    """CREATE VIRTUAL TABLE messages_fts USING fts5(
        subject, addresses, body, content='', tokenize='unicode61 remove_diacritics 2'
    )""",
    f"""CREATE TRIGGER messages_fts_ai AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts(rowid, subject, addresses, body)
        VALUES (new.id, {_FTS_ROW.format(p="new")});
    END""",
    # A contentless index forgets a row by being told its old values again.
    f"""CREATE TRIGGER messages_fts_ad AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, subject, addresses, body)
        VALUES ('delete', old.id, {_FTS_ROW.format(p="old")});
    END""",
    f"""CREATE TRIGGER messages_fts_au AFTER UPDATE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, subject, addresses, body)
        VALUES ('delete', old.id, {_FTS_ROW.format(p="old")});
        INSERT INTO messages_fts(rowid, subject, addresses, body)
        VALUES (new.id, {_FTS_ROW.format(p="new")});
    END""",
    f"""INSERT INTO messages_fts(rowid, subject, addresses, body)
        SELECT id, {_FTS_ROW.format(p="messages")} FROM messages""",
)


def _drop_old_raw(conn: sqlite3.Connection) -> None:
    """Free ``messages.raw`` after its bytes moved: DROP COLUMN where SQLite has it
    (3.35+), else the column is emptied (it is nullable and nothing reads it)."""
    if sqlite3.sqlite_version_info >= (3, 35, 0):
        conn.execute("ALTER TABLE messages DROP COLUMN raw")
    else:
        conn.execute("UPDATE messages SET raw = NULL")


def _move_raw(conn: sqlite3.Connection) -> None:
    """Migration 3: copy ``messages.raw`` into ``message_raw`` with bounded memory.

    Each new row is inserted as ``zeroblob(length(raw))`` (``length`` of a blob reads
    only its header) and filled from the old column in 1 MiB pieces, so the migration
    holds no whole message either. Runs inside the migration's transaction.
    """
    conn.execute(
        "INSERT INTO message_raw (key, raw) "
        "SELECT key, zeroblob(length(raw)) FROM messages WHERE raw IS NOT NULL"
    )
    pairs = conn.execute(
        "SELECT m.id, r.id FROM messages m JOIN message_raw r ON r.key = m.key"
    ).fetchall()
    for old, new in pairs:
        with conn.blobopen("messages", "raw", old, readonly=True) as src, \
                conn.blobopen("message_raw", "raw", new) as dst:
            copy_into(dst, src)


_V3: Final = (
    # raw is the LAST column: a trailing zeroblob stays small in the record (see
    # _sqlite_writes' raw_file operation); a rowid alias (id) because incremental blob I/O
    # addresses rows by rowid.
    """CREATE TABLE message_raw (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE REFERENCES messages(key) ON DELETE CASCADE,
        raw BLOB NOT NULL
    )""",
    _move_raw,
    _drop_old_raw,
)

# The body column indexes the text and the attachments' extracted text (`extract`).
# Rows indexed before keep the same tokens (a NULL adds only a line break), so the
# contentless index still forgets them by their old values.
_FTS_ROW_V4: Final = (
    "coalesce({p}.subject, ''), {p}.addresses, "
    "coalesce({p}.text, '') || char(10) || coalesce({p}.attachment_text, '')"
)
_V4: Final = (
    "ALTER TABLE messages ADD COLUMN attachment_text TEXT",
    "DROP TRIGGER messages_fts_ai",
    "DROP TRIGGER messages_fts_ad",
    "DROP TRIGGER messages_fts_au",
    *(
        statement.replace(_FTS_ROW.format(p="old"), _FTS_ROW_V4.format(p="old"))
        .replace(_FTS_ROW.format(p="new"), _FTS_ROW_V4.format(p="new"))
        for statement in _V2[3:6]  # the three triggers
    ),
)

# Migration 5: the store indexes the rows it inserts itself, one INSERT ... SELECT per
# write, in the transaction that inserts them (see _sqlite_rows._program, run by
# store.sqlite). FTS5 writes its pending terms out as a new segment at every statement
# savepoint, and every UPSERT that fires a trigger opens one: the insert trigger cost
# one segment per message, half the store's CPU (issue 18). The insert trigger stays
# for every other writer (``store_writing``, below); updates and deletes keep their
# triggers.
#
# The rows indexed are those the index holds no document for (no row of the
# contentless table's %_docsize, which FTS5 keeps per document) among the write's
# keys and the rows above the largest indexed id: the rows this write inserted,
# wherever SQLite put them (a random rowid once 2**63 - 1 is taken), and any row that
# reached the table without its document (a file written by this code before the
# trigger was kept for other writers). Run before the UPSERTs too, so that the
# update trigger's 'delete' of such a row finds its document: a contentless index
# told to forget a document it never had fails, SQLITE_CORRUPT_VTAB.
_INDEX_UNINDEXED: Final = (
    "INSERT INTO messages_fts(rowid, subject, addresses, body) "
    f"SELECT id, {_FTS_ROW_V4.format(p='messages')} FROM messages "
    "WHERE id IN (SELECT id FROM messages WHERE key IN (SELECT value FROM json_each(?)) "
    "UNION SELECT id FROM messages "
    "WHERE id > (SELECT coalesce(max(id), 0) FROM messages_fts_docsize)) "
    "AND NOT EXISTS (SELECT 1 FROM messages_fts_docsize d WHERE d.id = messages.id)"
)
# Every other writer (a version-4 mailpipe that opened the file before the migration,
# a user's INSERT, the sqlite3 shell) keeps the insert trigger: it fires unless the
# one row of ``store_writing`` says a store write is in progress, which only this
# store sets, inside its own write transaction (SQLite has one writer at a time, and
# the flag is back to 0 before COMMIT or gone with a ROLLBACK), so no other
# connection ever sees it set.
_V5: Final = (
    "CREATE TABLE store_writing (active INTEGER NOT NULL)",
    "INSERT INTO store_writing (active) VALUES (0)",
    "DROP TRIGGER IF EXISTS messages_fts_ai",  # (a user may have dropped it)
    _V4[4].replace(
        "AFTER INSERT ON messages BEGIN",
        "AFTER INSERT ON messages WHEN (SELECT active FROM store_writing) = 0 BEGIN",
    ),
)
assert "WHEN (SELECT active" in _V5[3] and "messages_fts_ai" in _V5[3]

#: A migration step: one SQL statement, or a function run on the connection.
Step = str | Callable[[sqlite3.Connection], None]

#: (version, description, steps), applied in order, each version in one transaction.
MIGRATIONS: Final[tuple[tuple[int, str, Sequence[Step]], ...]] = (
    (1, "messages, attachments and tags", _V1),
    (2, "flattened addresses and the FTS5 index", _V2),
    (3, "raw bytes in message_raw, the last column of their own row", _V3),
    (4, "attachment text in the FTS5 index", _V4),
    (5, "inserted rows indexed by the store, one statement per write", _V5),
)
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]

#: SQLite result codes that describe the environment (busy, disk, I/O): retry later.
_TEMPORARY: Final = (
    "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN",
    "SQLITE_READONLY", "SQLITE_NOMEM", "SQLITE_PROTOCOL", "SQLITE_CORRUPT",
    "SQLITE_NOTADB", "SQLITE_PERM", "SQLITE_AUTH", "SQLITE_NOLFS",
)


def classify(exc: sqlite3.Error, what: str) -> MailpipeError:
    """Map an sqlite3 error to TemporaryFailure (environment) or PermanentFailure."""
    code = getattr(exc, "sqlite_errorname", "") or ""
    unnamed_operational = isinstance(exc, sqlite3.OperationalError) and not code
    if code.startswith(_TEMPORARY) or unnamed_operational:
        return TemporaryFailure(f"{what}: {exc}")
    return PermanentFailure(f"{what}: {exc}")


def schema_version(conn: sqlite3.Connection) -> int:
    """Return the schema version of ``conn``'s database (0 when empty)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Apply the missing migrations up to ``target``; return the resulting version.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Each version runs
    in its own ``BEGIN IMMEDIATE`` transaction (all its steps and its
    ``schema_version`` row commit together or not at all, so a crash leaves the
    previous version intact), and concurrent openers migrate once. Re-running is a
    no-op. A database newer than this code raises PermanentFailure.

    Temporary storage is the build's default (files) while it runs: a migration's
    statement may rewrite a whole table (version 3 drops ``messages.raw``), and a
    statement journal kept in memory (``temp_store=MEMORY``, see :func:`connect`)
    would then hold every page it rewrote.
    """
    temp_store = conn.execute("PRAGMA temp_store").fetchone()[0]
    conn.execute("PRAGMA temp_store=DEFAULT")
    try:
        return _migrate(conn, target)
    finally:
        if not conn.in_transaction:
            conn.execute(f"PRAGMA temp_store={int(temp_store)}")


def _migrate(conn: sqlite3.Connection, target: int) -> int:
    for version, description, steps in MIGRATIONS:
        if version > target:
            break
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
                "applied_at TEXT NOT NULL)"
            )
            current = schema_version(conn)
            if current >= version:
                conn.execute("COMMIT")
                continue
            for step in steps:
                if isinstance(step, str):
                    conn.execute(step)
                else:
                    step(conn)
            conn.execute(
                "INSERT INTO schema_version(version, description, applied_at) "
                "VALUES (?, ?, ?)",
                (version, description, _now()),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLITE_FULL/IOERR already rolled it back:
                conn.execute("ROLLBACK")  # a ROLLBACK then would hide the cause
            raise
        log.info("sqlite_schema_migrated", version=version, description=description)
    current = schema_version(conn)
    if current > SCHEMA_VERSION:
        raise PermanentFailure(
            f"database schema version {current} is newer than this mailpipe "
            f"({SCHEMA_VERSION}); upgrade mailpipe"
        )
    return current


def connect(path: Path, *, timeout: float = 30.0) -> sqlite3.Connection:
    """Open ``path`` with the store's settings (:func:`._sqlite_writes.open_connection`:
    autocommit, WAL, synchronous=FULL, foreign keys, temporary storage in memory)."""
    return open_connection(path, timeout=timeout)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
