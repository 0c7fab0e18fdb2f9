"""store.sqlite: messages, attachments and tags in SQLite with an FTS5 full-text index.

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
  message held in memory are bound as they are: the same row). Read it with :func:`open_raw` (in pieces) or
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
  :func:`search` or ``SELECT m.* FROM messages_fts JOIN messages m ON m.id =
  messages_fts.rowid WHERE messages_fts MATCH ?``.

Durability: WAL with ``synchronous=FULL``. With ``group_commit`` (the default) the rows
of in-memory messages are prepared and checked in ``process()`` and written at
``flush()`` in one transaction (the engine calls ``flush()`` before any DELE of the
messages it covers), so the database's write lock is held only inside ``flush()``;
without it, and for spooled messages, each message is its own transaction. Rows
written in a group become visible to readers only once ``flush()`` returns (or
earlier, when ``process()`` writes the group on reaching ``MAX_ROWS`` rows or
``MAX_HELD`` octets of prepared values).

A failed group transaction fails the whole group, whatever the cause (the database
busy, full or failing, or an error of one message that the checks in ``process()``
could not foresee): nothing of it is stored, ``flush()`` raises, so the engine takes
none of its messages as durable, and each of its keys is written in ``process()``
next time in a transaction of its own (an error of one message then reaches only
that message). When the write that ``process()`` starts on reaching a bound fails,
that ``process()`` raises and the next ``flush()`` raises too (the earlier
messages' rows were in it).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Final, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from mailpipe.document import message_document
from mailpipe.errors import MailpipeError, PermanentFailure, TemporaryFailure
from mailpipe.message import Message
from mailpipe.processor import LATER, ProcessorContext
from mailpipe.units import Duration

from ._fs import make_dirs

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
    # Backfill with the same flattening as _flatten_addresses() below.
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

_RAW_CHUNK: Final = 1 << 20


def _copy_into(dst: sqlite3.Blob, src: sqlite3.Blob | BinaryIO) -> None:
    """Copy ``src`` to ``dst`` in 1 MiB pieces (``dst`` already has the right size)."""
    for chunk in iter(lambda: src.read(_RAW_CHUNK), b""):
        dst.write(chunk)


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
            _copy_into(dst, src)


_V3: Final = (
    # raw is the LAST column: a trailing zeroblob stays small in the record (see
    # _write); a rowid alias (id) because incremental blob I/O addresses rows by rowid.
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
# write, in the transaction that inserts them (see SqliteStore._write_rows). FTS5
# writes its pending terms out as a new segment at every statement savepoint, and
# every UPSERT that fires a trigger opens one: the insert trigger cost one segment per
# message, half the store's CPU (issue 18). The insert trigger stays for every other
# writer (``store_writing``, below); updates and deletes keep their triggers.
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
    """Open ``path`` in autocommit mode with WAL, synchronous=FULL, foreign keys and
    temporary storage in memory."""
    conn = sqlite3.connect(
        path, timeout=timeout, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    # Statement journals (the FTS triggers make each upsert of a group commit keep
    # one) stay in memory instead of spilling to temporary files: they only undo a
    # statement, never serve crash recovery (the WAL does), so durability is the same.
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


def search(conn: sqlite3.Connection, query: str, limit: int = 50) -> list[str]:
    """Return the keys of messages matching the FTS5 ``query``, best first."""
    rows = conn.execute(
        "SELECT m.key FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
        "WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?",
        (query, limit),
    ).fetchall()
    return [str(r[0]) for r in rows]


def open_raw(conn: sqlite3.Connection, key: str) -> sqlite3.Blob | None:
    """Open message ``key``'s raw bytes for reading in pieces; None if none are stored.

    The returned read-only :class:`sqlite3.Blob` is a context manager; read it in
    chunks so a large message is never held whole.
    """
    row = conn.execute("SELECT id FROM message_raw WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    return conn.blobopen("message_raw", "raw", row[0], readonly=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _address_count(record: Any) -> int:
    """The number of addresses in ``record`` (a MessageRecord or its dict)."""
    get = record.get if isinstance(record, dict) else partial(getattr, record)
    return sum(len(get(field, None) or ()) for field, _ in _ADDRESS_FIELDS)


def _flatten_addresses(doc: dict[str, Any]) -> str:
    parts = []
    for field, _ in _ADDRESS_FIELDS:
        for a in doc.get(field) or ():
            parts.append(f"{a.get('name') or ''} {a.get('address') or ''}".strip())
    return " ".join(parts)


#: ``json.dumps(value, ensure_ascii=True, separators=(",", ":"), default=str)``,
#: built once: ``dumps`` with arguments builds a new encoder on every call, and a
#: message's row takes seven documents (issue 18). Without the check for circular
#: references (a tenth of the time): a message's document is built from JSON values
#: (``model_dump(mode="json")``), and the output is the same.
_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), default=str, check_circular=False
)


def _json(value: Any) -> str:
    return _ENCODER.encode(value)


class SqliteOptions(BaseModel):
    """Options of ``store.sqlite``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    path: Path = Field(description="SQLite database file; created with its schema.")
    raw: Literal["inline", "none"] = Field(
        default="inline",
        description="'inline' keeps the raw message bytes in message_raw.raw; 'none' "
        "not.",
    )
    group_commit: bool = Field(
        strict=True,
        default=True,
        description="Prepare each message's rows in process() and write them all in "
        "one transaction at flush() (the engine flushes before any DELE), holding "
        "the write lock only there; false: commit each message before process() "
        "returns.",
    )
    busy_timeout: Duration = Field(
        default=30.0, description="How long to wait for a lock held by another writer."
    )


_COLUMNS: Final = (
    "key", "mailbox", "uid", "sha256", "size", "parsed", "message_id", "date",
    "date_raw", *_ADDRESS_COLUMNS, "addresses", "subject", "thread_key", "list_id",
    "auto_reply", "text", "text_from_html", "html", "record", "stored_at",
    "updated_at", "attachment_text",
)
_KEEP_ON_UPDATE: Final = ("key", "stored_at")
_UPSERT: Final = (
    f"INSERT INTO messages ({', '.join(_COLUMNS)}) VALUES ("
    + ", ".join("?" for _ in _COLUMNS)
    + ") ON CONFLICT(key) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c not in _KEEP_ON_UPDATE)
)


def _write_raw(conn: sqlite3.Connection, key: str, message: Message) -> None:
    """Insert ``key``'s raw bytes from a spooled ``message``, in bounded memory (the
    caller deleted the old ones).

    The row is inserted with ``zeroblob(size)`` as its last column, which SQLite keeps
    as a zero count in the record (a zeroblob followed by other columns would be
    materialised in memory), then filled from ``message.open()`` in 1 MiB pieces
    through incremental blob I/O. The bytes of a message held in memory are bound as
    they are instead (see :meth:`SqliteStore._write_rows`): the same row.
    """
    rowid = conn.execute(
        "INSERT INTO message_raw (key, raw) VALUES (?, zeroblob(?))", (key, message.size)
    ).lastrowid
    assert rowid is not None
    with conn.blobopen("message_raw", "raw", rowid) as blob, message.open() as f:
        _copy_into(blob, f)


@dataclass(slots=True)
class _Rows:
    """One message's prepared rows, written at flush()."""

    key: str
    message: list[Any]  # the messages row, in _COLUMNS order
    attachments: list[tuple[Any, ...]]
    tags: list[tuple[str, str]]
    raw: Message | None  # in memory (``data``), or None with raw = "none"
    octets: int


def _check(rows: _Rows) -> None:
    """Raise, before anything is buffered, what SQLite would refuse for this message
    alone at flush(): a repeated attachment index or tag (the primary keys), text it
    cannot encode, an integer out of its range. Only failures of the database itself
    (busy, full, I/O) are left for flush()."""
    for table, names in (
        ("attachments.key, attachments.idx", [a[1] for a in rows.attachments]),
        ("tags.key, tags.tag", [t[1] for t in rows.tags]),
    ):
        if len(set(names)) != len(names):
            raise sqlite3.IntegrityError(f"UNIQUE constraint failed: {table}")
    for row in (rows.message, *rows.attachments, *rows.tags):
        for value in row:
            if isinstance(value, str):
                if not value.isascii():  # a flag of the string: ASCII encodes
                    value.encode("utf-8")  # lone surrogates: UnicodeEncodeError
            elif isinstance(value, int) and not -(1 << 63) <= value < (1 << 63):
                raise OverflowError("Python int too large to convert to SQLite INTEGER")


class SqliteStore:
    """Upsert each message (record, attachments, tags, raw bytes) into SQLite.

    Idempotent by ``message.key``: a re-run replaces the row in place (one row per key,
    attachments and tags rewritten). Without a ``parse`` step the row holds the key,
    uid, sha256, raw bytes and the few header fields of
    :func:`mailpipe.document.minimal_record`.
    """

    name: ClassVar[str] = "store.sqlite"
    Options: ClassVar[type[BaseModel]] = SqliteOptions
    commits: ClassVar[bool] = True
    idempotent: ClassVar[bool] = True  # writes are keyed by message.key

    def __init__(self, options: SqliteOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context
        self.path = context.resolve(options.path)
        self._conn: sqlite3.Connection | None = None
        # group_commit: prepared rows by key, written at flush() (bounded: MAX_*), and
        # keys whose group write failed (written in process() next time, so an error
        # of their own reaches their own message).
        self._rows: dict[str, _Rows] = {}
        self._held = 0
        self._inline: set[str] = set()
        # A write triggered in process() by the MAX_* limits that failed: the rows of
        # messages whose process() had returned were lost with it, so the next
        # flush() raises it (none of the group is taken as durable, MP-04).
        self._failure: MailpipeError | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        """Open the database, creating or migrating its schema (not in dry-run)."""
        if self.context.dry_run:
            return
        with self._lock:
            self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                make_dirs(self.path.parent)
                conn = connect(self.path, timeout=self.options.busy_timeout)
                try:
                    migrate(conn)
                except BaseException:
                    conn.close()
                    raise
            except sqlite3.Error as exc:
                raise classify(exc, f"{self.name} {self.path}") from exc
            self._conn = conn
        return self._conn

    #: Prepared rows held at most before process() writes them (one transaction).
    MAX_ROWS: ClassVar[int] = 512
    #: Octets of prepared values held at most (raw bytes and every str/bytes value of
    #: the rows: record JSON, bodies, attachment text, tags): bounds peak RSS.
    MAX_HELD: ClassVar[int] = 8 << 20

    def close(self) -> None:
        """Write any prepared rows (one transaction) and close the connection."""
        with self._lock:
            try:
                if self._rows:
                    self._commit()
            finally:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

    def flush(self) -> None:
        """Write the prepared rows, if any, in one transaction (durable when this
        returns). On failure nothing of them is stored, and their keys are written
        in process() next time.

        Raises, too, when a write that process() started on reaching MAX_ROWS or
        MAX_HELD failed since the last flush(): the rows of earlier messages of the
        group were in it, so the group is not durable (its keys are written in
        process() next time)."""
        with self._lock:
            failure, self._failure = self._failure, None
            self._commit()
            if failure is not None:
                raise failure

    def _commit(self) -> None:
        rows, self._rows, self._held = self._rows, {}, 0
        if not rows:
            return
        try:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._write_rows(conn, list(rows.values()))
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except Exception as exc:
            self._inline.update(rows)
            if isinstance(exc, sqlite3.Error):
                raise classify(exc, f"{self.name} group commit") from exc
            raise
        log.info("sqlite_group_committed", store=self.name, messages=len(rows))

    def process(self, message: Message) -> None:
        """Upsert the message; durable on return unless ``group_commit`` is set."""
        if self.context.dry_run:
            log.info("store_skipped_dry_run", store=self.name, key=message.key)
            return
        doc = message_document(message, stored_at=datetime.now(UTC))
        raw = message if self.options.raw == "inline" else None
        prepared = self._prepare(doc, raw)
        grouped = (
            self.options.group_commit
            and message.key not in self._inline
            and (raw is None or raw.data is not None)  # spooled: written now
        )
        with self._lock:
            try:
                if grouped:
                    self._stage(prepared)
                    if len(self._rows) >= self.MAX_ROWS or self._held >= self.MAX_HELD:
                        self._commit_early(prepared.key)
                else:
                    self._rows.pop(prepared.key, None)  # an older version of it
                    conn = self._connect()
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        self._write_rows(conn, [prepared])
                    except BaseException:
                        if conn.in_transaction:  # see _migrate: never hide the cause
                            conn.execute("ROLLBACK")
                        raise
                    conn.execute("COMMIT")
                    self._inline.discard(prepared.key)
            except sqlite3.Error as exc:
                raise classify(exc, f"{self.name} {self.path}") from exc
        log.debug("message_stored", store=self.name, key=message.key, grouped=grouped)

    #: The largest in-memory message :meth:`process_nowait` stages on the event loop.
    #: Its document, rows and checks cost ~40 µs, plus ~1-2 µs for each address,
    #: header field and attachment, which a message of this size holds few of:
    #: ~0.35 ms at worst for the shapes of bench/RESULTS.md §35 (with at most
    #: NOWAIT_ADDRESSES addresses; review r-e2e). A larger one is staged on the
    #: step's thread.
    NOWAIT_OCTETS: ClassVar[int] = 8 << 10
    #: At most so many addresses in the record (each costs ~1 µs of JSON and FTS
    #: text; 8 KiB of ``To: a,a,…`` parsed on the step's thread holds ~3900: ~4 ms).
    NOWAIT_ADDRESSES: ClassVar[int] = 64

    def process_nowait(self, message: Message) -> object:
        """:meth:`process` on the event loop when it only stages the message's rows in
        the held group (issue 18): ``group_commit`` on, not a dry run, a parsed
        message whose raw bytes are in memory and at most NOWAIT_OCTETS, the key
        not one whose group write failed, the store's lock free at once, and the group below
        MAX_ROWS and MAX_HELD with it. Anything that would write to the database
        returns ``LATER`` having changed nothing, and :meth:`process` runs on the
        step's thread. A message that the checks refuse raises as in :meth:`process`
        (nothing staged). A pending failure of an early write stays for flush()
        (MP-04), as when :meth:`process` stages.

        A message without a record (no ``parse`` step before the store) is left to
        the step's thread too: its document comes from the stdlib's email parser,
        whose cost the message's sender chooses (S-12); so is one whose record holds
        more than NOWAIT_ADDRESSES addresses."""
        if (
            self.context.dry_run
            or not self.options.group_commit
            or message.record is None
            or message.data is None
            or len(message.data) > self.NOWAIT_OCTETS
            or message.key in self._inline  # (read again under the lock)
            or _address_count(message.record) > self.NOWAIT_ADDRESSES
        ):
            return LATER
        doc = message_document(message, stored_at=datetime.now(UTC))
        prepared = self._prepare(doc, message if self.options.raw == "inline" else None)
        if not self._lock.acquire(blocking=False):  # (a flush() or close() running)
            return LATER
        try:
            replaced = self._rows.get(prepared.key)
            rows = len(self._rows) + (replaced is None)
            held = self._held + prepared.octets - (
                replaced.octets if replaced is not None else 0
            )
            if (
                prepared.key in self._inline
                or rows >= self.MAX_ROWS
                or held >= self.MAX_HELD
            ):
                return LATER  # process() writes
            try:
                self._stage(prepared)
            except sqlite3.Error as exc:
                raise classify(exc, f"{self.name} {self.path}") from exc
        finally:
            self._lock.release()
        log.debug("message_stored", store=self.name, key=message.key, grouped=True)
        return None

    def _stage(self, prepared: _Rows) -> None:
        """Check ``prepared`` and hold it in the group (replacing the key's older
        rows); the caller holds the lock."""
        _check(prepared)
        replaced = self._rows.pop(prepared.key, None)
        if replaced is not None:
            self._held -= replaced.octets
        self._rows[prepared.key] = prepared
        self._held += prepared.octets

    def _commit_early(self, key: str) -> None:
        """Write the held group now (the MAX_* bounds). On failure a
        TemporaryFailure is kept for the next flush(), which raises it: messages
        whose process() has returned lost their rows with the failed transaction
        (their keys are written in process() next time). This message's own rows
        were in it too, so its process() raises the error itself (retried, not
        lost)."""
        try:
            self._commit()
        except Exception as exc:
            self._failure = TemporaryFailure(
                f"{self.name}: the group write started in process() failed, the "
                f"group's earlier messages are not stored: {exc}"
            )
            raise
        log.debug("sqlite_group_written_early", store=self.name, key=key)

    def _write_rows(self, conn: sqlite3.Connection, group: Sequence[_Rows]) -> None:
        """Write the prepared rows of ``group`` (distinct keys) in the caller's
        transaction: each statement once for the whole group (``executemany``), not
        once per message (issue 18). The result is the rows that writing each
        message alone gives: its messages row upserted, then its raw bytes,
        attachments and tags replaced.

        The FTS5 entries of the rows it inserts are written here, in the same
        transaction (:data:`_INDEX_UNINDEXED`, once before the UPSERTs and once
        after; the update trigger re-indexes a replaced row):
        a committed row always has its index entry and an index entry its row, as
        with the insert trigger of versions 2-4."""
        if not group:
            return
        # The rows of the group's keys not indexed yet (inserted by another writer)
        # before the update trigger forgets their old values, then the rows inserted.
        group_keys = (_json([rows.key for rows in group]),)
        conn.execute(_INDEX_UNINDEXED, group_keys)
        conn.execute("UPDATE store_writing SET active = 1")  # the insert trigger off
        conn.executemany(_UPSERT, [rows.message for rows in group])
        conn.execute("UPDATE store_writing SET active = 0")  # before anyone sees it
        conn.execute(_INDEX_UNINDEXED, group_keys)
        keys = [(rows.key,) for rows in group]
        conn.executemany("DELETE FROM message_raw WHERE key = ?", keys)
        conn.executemany("DELETE FROM attachments WHERE key = ?", keys)
        conn.executemany("DELETE FROM tags WHERE key = ?", keys)
        conn.executemany(
            "INSERT INTO message_raw (key, raw) VALUES (?, ?)",
            [
                (rows.key, rows.raw.data)
                for rows in group
                if rows.raw is not None and rows.raw.data is not None
            ],
        )
        for rows in group:
            if rows.raw is not None and rows.raw.data is None:  # spooled
                _write_raw(conn, rows.key, rows.raw)
        conn.executemany(
            "INSERT INTO attachments (key, idx, filename, content_type, disposition, "
            "size, sha256, content_id, inline, part) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [a for rows in group for a in rows.attachments],
        )
        conn.executemany(
            "INSERT INTO tags (key, tag) VALUES (?, ?)",
            [t for rows in group for t in rows.tags],
        )

    def _prepare(self, doc: dict[str, Any], raw: Message | None) -> _Rows:
        """The message's rows (no database access)."""
        key = doc["key"]
        now = doc.get("stored_at") or _now()  # (the record's own, when it has one)
        rest = {k: v for k, v in doc.items() if k not in ("text", "html")}
        values: dict[str, Any] = {
            "key": key,
            "mailbox": doc["mailbox"],
            "uid": doc["uid"],
            "sha256": doc["sha256"],
            "size": doc["size"],
            "parsed": int(bool(doc.get("parsed"))),
            "message_id": doc.get("message_id"),
            "date": doc.get("date"),
            "date_raw": doc.get("date_raw"),
            "addresses": _flatten_addresses(doc),
            "subject": doc.get("subject"),
            "thread_key": doc.get("thread_key") or None,
            "list_id": doc.get("list_id"),
            "auto_reply": int(bool(doc.get("auto_reply"))),
            "text": doc.get("text"),
            "text_from_html": int(bool(doc.get("text_from_html"))),
            "html": doc.get("html"),
            "record": _json(rest),
            "stored_at": now,
            "updated_at": now,
            "attachment_text": "\n".join(
                a["text"] for a in doc.get("attachments") or () if a.get("text")
            ) or None,
        }
        for field, column in _ADDRESS_FIELDS:
            addresses = doc.get(field)
            values[column] = _json(addresses) if addresses else "[]"
        rows = _Rows(
            key=key,
            message=[values[c] for c in _COLUMNS],
            attachments=[
                (
                    key, a.get("index", i), a.get("filename"),
                    a.get("content_type") or "application/octet-stream",
                    a.get("disposition"), int(a.get("size") or 0),
                    a.get("sha256") or "",
                    a.get("content_id"), int(bool(a.get("inline"))), a.get("part"),
                )
                for i, a in enumerate(doc.get("attachments") or ())
            ],
            tags=[(key, t) for t in doc.get("tags") or ()],
            raw=raw,
            octets=0,
        )
        # MAX_HELD counts every prepared value (record JSON, attachment text, …).
        rows.octets = (raw.size if raw is not None else 0) + sum(
            len(v)
            for row in (rows.message, *rows.attachments, *rows.tags)
            for v in row
            if isinstance(v, (str, bytes))  # (a tuple: faster than str | bytes)
        )
        return rows


PROCESSORS = [SqliteStore]
