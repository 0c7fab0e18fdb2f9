"""store.sqlite: messages, attachments and tags in SQLite with an FTS5 full-text index.

The schema (its tables, the FTS5 index and the migrations to :data:`SCHEMA_VERSION`,
applied on open) is described and defined in :mod:`._sqlite_schema`.
:meth:`SqliteStore._prepare` builds one message's rows; :mod:`._sqlite_rows` has the
rows' holder, the checks made before rows are held, the ``messages`` UPSERT and the
statements that write a group of rows (``_program``), run by :mod:`._sqlite_writes`
(in the step's thread or in the writer process). Read the archive
with :func:`search` (FTS5) and :func:`open_raw` (raw bytes in pieces).

Durability: WAL with ``synchronous=FULL``. With ``group_commit`` (the default) the rows
of in-memory messages are prepared and checked in ``process()`` and are durable when
``flush()`` returns (the engine calls ``flush()`` before any DELE of the messages it
covers); without it, and for spooled messages (but those of at most
``SPOOLED_IN_CHUNK`` octets with ``writer = "process"``), each message is its own
transaction, durable when ``process()`` returns. Who writes a group, by the
``writer`` option:

- ``"process"`` (the default; issue 18): a writer process (:mod:`._sqlite_writer`)
  commits the held rows in chunks of at most ``CHUNK_ROWS`` messages or
  ``CHUNK_OCTETS`` octets, each in its own transaction, while the chain goes on with
  the next messages; ``flush()`` sends what is held and waits until every chunk is
  committed. Rows become visible as their chunk commits; the write lock is held for
  one chunk at a time.
- ``"thread"``: ``flush()`` writes them in one transaction, so the database's write
  lock is held only inside ``flush()``, and rows become visible once it returns (or
  earlier, when ``process()`` writes the group on reaching ``MAX_ROWS`` rows or
  ``MAX_HELD`` octets of prepared values).

A failed transaction of a group (or of one of its chunks) fails the whole group,
whatever the cause (the database busy, full or failing, or an error of one message
that the checks in ``process()`` could not foresee): nothing of that transaction is
stored, ``flush()`` raises, so the engine takes none of the group's messages as
durable, and each key of the failed transaction is written in ``process()`` next time
in a transaction of its own (an error of one message then reaches only that message).
When the write that ``process()`` starts on reaching a bound fails, that ``process()``
raises and the next ``flush()`` raises too (the earlier messages' rows were in it); a
chunk's failure in the writer process is raised by the next ``flush()`` (MP-04), and a
writer process that dies fails every chunk it had not committed.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from mailpipe.document import message_document
from mailpipe.errors import MailpipeError, TemporaryFailure
from mailpipe.message import Message
from mailpipe.processor import LATER, ProcessorContext
from mailpipe.units import Duration

from ._fs import make_dirs
from ._sqlite_rows import _COLUMNS as _COLUMNS  # its former home
from ._sqlite_rows import _UPSERT as _UPSERT  # its former home
from ._sqlite_rows import (
    _address_count,
    _check,
    _flatten_addresses,
    _json,
    _program,
    _Rows,
)
from ._sqlite_schema import _ADDRESS_FIELDS, _now
from ._sqlite_schema import MIGRATIONS as MIGRATIONS  # its former home
from ._sqlite_schema import SCHEMA_VERSION as SCHEMA_VERSION  # its former home
from ._sqlite_schema import Step as Step  # its former home
from ._sqlite_schema import classify as classify  # its former home
from ._sqlite_schema import connect as connect  # its former home
from ._sqlite_schema import migrate as migrate  # its former home
from ._sqlite_schema import schema_version as schema_version  # its former home
from ._sqlite_writer import WriterProcess
from ._sqlite_writes import run_program

log = structlog.get_logger()


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
        description="Prepare each message's rows in process(); they are durable when "
        "flush() returns (the engine flushes before any DELE), written as the "
        "writer option says; false: commit each message before process() returns.",
    )
    busy_timeout: Duration = Field(
        default=30.0, description="How long to wait for a lock held by another writer."
    )
    writer: Literal["process", "thread"] = Field(
        default="process",
        description="With group_commit: 'process' hands the held rows, in chunks of "
        "at most 128 messages or 1 MiB, to a writer process (the same Python, "
        "started at the first write) that commits each chunk while the chain goes "
        "on, flush() waiting for what is still being written; 'thread' writes them "
        "all at flush() in the step's thread.",
    )


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
        # writer = "process": the child writing chunks (started at the first), and
        # the keys of each chunk sent since the last flush(), by sequence number.
        self._writer: WriterProcess | None = None
        self._sent: dict[int, list[str]] = {}

    @property
    def _in_process(self) -> bool:
        """Whether the held rows go to the writer process (see the ``writer`` option)."""
        return self.options.group_commit and self.options.writer == "process"

    def _bounds(self) -> tuple[int, int]:
        """Rows and octets held at most before process() writes (or sends) them."""
        if self._in_process:
            return self.CHUNK_ROWS, self.CHUNK_OCTETS
        return self.MAX_ROWS, self.MAX_HELD

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
    #: writer = "process": rows (messages) and octets of a chunk sent to the writer
    #: process; chunks sent and not yet committed hold at most MAX_HELD -
    #: CHUNK_OCTETS octets. A chunk is sent at the message that makes it reach a
    #: bound, so it holds less than CHUNK_OCTETS + that message's octets, and its rows
    #: and their pickle are both held while it is sent: the peak is about MAX_HELD +
    #: the largest message's octets (a spooled one of up to SPOOLED_IN_CHUNK raw plus
    #: its text and html: about 14 MiB with the defaults; 13 MiB of allocations
    #: measured with a 3.9 MiB spooled message and 5.5 MiB of chunks unanswered).
    CHUNK_ROWS: ClassVar[int] = 128
    CHUNK_OCTETS: ClassVar[int] = 1 << 20
    #: writer = "process": a spooled message of at most so many octets is read into
    #: memory and sent in a chunk, as an in-memory one (a larger one is written by
    #: its process(), its bytes streamed from the spool file by the writer). It raises
    #: the peak by up to as much (see CHUNK_OCTETS).
    SPOOLED_IN_CHUNK: ClassVar[int] = 4 << 20

    def close(self) -> None:
        """Write any prepared rows and close the connection (and the writer process);
        raises as flush() does."""
        with self._lock:
            try:
                if self._in_process:
                    self._settle()
                elif self._rows:
                    self._commit()
            finally:
                writer, self._writer = self._writer, None
                if writer is not None:
                    writer.close()
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

    def flush(self) -> None:
        """Make the prepared rows durable: with writer = "thread", write them in one
        transaction; with writer = "process", send them as a last chunk and wait
        until every chunk sent since the last flush() is answered (durable when this
        returns). On failure nothing of the failed transaction is stored, and its
        keys are written in process() next time.

        Raises, too, when a write that process() started on reaching MAX_ROWS or
        MAX_HELD failed since the last flush(): the rows of earlier messages of the
        group were in it, so the group is not durable (its keys are written in
        process() next time)."""
        with self._lock:
            if self._in_process:
                self._settle()
                return
            failure, self._failure = self._failure, None
            self._commit()
            if failure is not None:
                raise failure

    def _settle(self) -> None:
        """writer = "process": send the held rows, wait until the writer has answered
        every chunk sent since the last flush(); raise the first failure (the keys of
        each failed chunk are written in process() next time). The caller holds the
        lock."""
        failure: BaseException | None
        failure, self._failure = self._failure, None
        messages = len(self._rows) + sum(len(keys) for keys in self._sent.values())
        try:
            self._send()
        except Exception as exc:
            failure = failure or exc
        if self._writer is not None:
            for seq, error in sorted(self._writer.wait_all().items()):
                keys = self._sent.pop(seq, [])
                if error is not None:
                    self._inline.update(keys)
                    failure = failure or error
        self._sent.clear()
        if failure is not None:
            raise self._classified(failure, "group commit") from failure
        if messages:
            log.info("sqlite_group_committed", store=self.name, messages=messages)

    def _classified(self, exc: BaseException, what: object) -> BaseException:
        """``exc`` as the store raises it: an sqlite3 error classified, else itself."""
        if isinstance(exc, sqlite3.Error):
            return classify(exc, f"{self.name} {what}")
        return exc

    def _writer_process(self) -> WriterProcess:
        if self._writer is None:
            self._writer = WriterProcess(
                str(self.path),
                float(self.options.busy_timeout),
                max_pending=self.MAX_HELD - self.CHUNK_OCTETS,
            )
        return self._writer

    def _send(self) -> None:
        """writer = "process": hand the held rows to the writer process as one chunk
        (one transaction); on failure their keys are written in process() next time.
        The caller holds the lock."""
        rows, self._rows, self._held = self._rows, {}, 0
        if not rows:
            return
        group = list(rows.values())
        try:
            seq = self._writer_process().submit(
                _program(group), sum(r.octets for r in group)
            )
        except BaseException:
            self._inline.update(rows)
            raise
        self._sent[seq] = list(rows)

    def _commit(self) -> None:
        rows, self._rows, self._held = self._rows, {}, 0
        if not rows:
            return
        try:
            run_program(self._connect(), _program(list(rows.values())))
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
        if (
            raw is not None
            and raw.data is None
            and self._in_process
            and message.key not in self._inline
            and raw.size <= self.SPOOLED_IN_CHUNK
        ):
            # Its bytes go in a chunk like an in-memory message's (issue 18): the
            # spool file may be gone before the writer reads it.
            raw = Message(ref=message.ref, data=message.raw)
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
                    max_rows, max_held = self._bounds()
                    if len(self._rows) >= max_rows or self._held >= max_held:
                        self._commit_early(prepared.key)
                elif self._in_process:
                    self._unstage(prepared.key)  # an older version of it
                    # (after any chunk holding an older version: the writer keeps
                    # the order). What SQLite would refuse for this message raises
                    # here, as it does in the step's thread: the child reports any
                    # error but sqlite3's as a TemporaryFailure.
                    _check(prepared)
                    writer = self._writer_process()
                    error = writer.wait(
                        writer.submit(_program([prepared]), prepared.octets)
                    )
                    if error is not None:
                        raise self._classified(error, self.path) from error
                    self._inline.discard(prepared.key)
                else:
                    self._unstage(prepared.key)  # an older version of it
                    run_program(self._connect(), _program([prepared]))
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
            max_rows, max_held = self._bounds()
            if prepared.key in self._inline or rows >= max_rows or held >= max_held:
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
        self._unstage(prepared.key)
        self._rows[prepared.key] = prepared
        self._held += prepared.octets

    def _unstage(self, key: str) -> None:
        """Drop ``key``'s held rows, if any, and their octets; the caller holds the
        lock."""
        replaced = self._rows.pop(key, None)
        if replaced is not None:
            self._held -= replaced.octets

    def _commit_early(self, key: str) -> None:
        """Write the held group now (the MAX_* bounds; with writer = "process", send
        it to the writer at the CHUNK_* bounds). On failure a
        TemporaryFailure is kept for the next flush(), which raises it: messages
        whose process() has returned lost their rows with the failed transaction
        (their keys are written in process() next time). This message's own rows
        were in it too, so its process() raises the error itself (retried, not
        lost)."""
        try:
            if self._in_process:
                self._send()
            else:
                self._commit()
        except Exception as exc:
            self._failure = TemporaryFailure(
                f"{self.name}: the group write started in process() failed, the "
                f"group's earlier messages are not stored: {exc}"
            )
            raise
        log.debug("sqlite_group_written_early", store=self.name, key=key)

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
