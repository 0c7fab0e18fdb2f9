"""SqliteJournal: the embedded journal (one SQLite file in WAL mode, synchronous=FULL).

Every method commits before it returns, except inside :meth:`SqliteJournal.batch` (one
transaction for the block, committed at exit): durability, threads, batches and fenced
commits are in :mod:`mailpipe.journal.sqlite_transactions`. The class is built in
layers: :class:`~mailpipe.journal.sqlite_transactions.SqliteTransactions`, then
:class:`~mailpipe.journal.sqlite_leases.SqliteLeases` (mailbox locks: flocks, lease
epochs) and :class:`~mailpipe.journal.sqlite_cursors.SqliteCursors` (listing
cursors), then the entries and poll records here. The schema and its
migrations: :mod:`mailpipe.journal.sqlite_schema`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import structlog

from mailpipe.journal.base import (
    Entry,
    Fence,
    Finish,
    PollRecord,
    Status,
    iter_chunks,
)
from mailpipe.journal.errors import JournalError, JournalMissingError
from mailpipe.journal.rows import (
    ENTRY_COLUMNS,
    POLL_COLUMNS,
    entry,
    poll_params,
    poll_record,
    poll_upsert,
)
from mailpipe.journal.sqlite_cursors import SqliteCursors
from mailpipe.journal.sqlite_leases import SqliteLeases
from mailpipe.journal.sqlite_leases import lock_path as lock_path  # its former home
from mailpipe.journal.sqlite_schema import MIGRATIONS as MIGRATIONS  # its former home
from mailpipe.journal.sqlite_schema import SCHEMA_VERSION, migrate, open_read_only
from mailpipe.message import message_key

log = structlog.get_logger()

_MEMORY: Final = ":memory:"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _time(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)



class SqliteJournal(SqliteLeases, SqliteCursors):
    """The embedded :class:`~mailpipe.journal.base.Journal` in one SQLite file.

    ``path`` is created with its parent folders; ``":memory:"`` works for tests (mailbox
    locks are then local to this object). ``busy_timeout`` is how long a write waits for
    another process's transaction. ``clock`` returns the current UTC time (tests).
    ``read_only`` (``mailpipe status``) creates, migrates and changes nothing: a
    missing file raises JournalMissingError, another schema version than this code's
    raises SchemaOutdatedError or SchemaVersionError (see
    :func:`mailpipe.readonly.connect_read_only` for a read-only folder).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 30.0,
        clock: Callable[[], datetime] = _utcnow,
        read_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self._memory = str(path) == _MEMORY
        self._clock = clock
        self._lock = threading.RLock()
        self._depth = 0
        self._relaxed = False
        self._locks: dict[str, tuple[str, int | None]] = {}
        self._epochs: dict[str, int] = {}  # the lease epoch of each lock held here
        # (owner, epoch) of the last take of each mailbox through this object, held or
        # released: a take that finds them still in the leases row writes nothing.
        self._taken: dict[str, tuple[str, int]] = {}
        self._lock_paths: dict[str, Path] = {}
        self._shut = False  # close() ran (``_closed`` alone: refusing work, see _unsynced)
        if read_only:
            if self._memory:
                raise JournalMissingError(f"journal {self.path} does not exist")
            self._conn = open_read_only(self.path)
            self._closed = False
            return
        try:
            if not self._memory:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(path),
                timeout=busy_timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
            )
        except (sqlite3.Error, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else exc
            raise JournalError(f"cannot open journal {path}: {why}") from exc
        self._closed = False
        try:
            with self._guard():  # a full disk fails here first (the WAL file)
                mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                self._conn.execute("PRAGMA synchronous=FULL")
            if not self._memory and str(mode).lower() != "wal":
                raise JournalError(f"journal {path}: WAL mode refused (got {mode})")
            self._migrate()
            with self._guard():
                # Statement journals of a group commit's batch stay in memory: they
                # only undo one statement, never serve crash recovery (the WAL does).
                # Not while migrating: a migration's statement (an index built, a
                # table rewritten) would keep all it sorts or rewrites in memory.
                self._conn.execute("PRAGMA temp_store=MEMORY")
        except BaseException:
            self._conn.close()
            raise


    def _migrate(self) -> None:
        with self._guard():
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = migrate(conn, where=f"journal {self.path}")
                conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        if current != SCHEMA_VERSION:
            log.info(
                "journal_migrated",
                path=str(self.path),
                from_version=current,
                to_version=SCHEMA_VERSION,
            )

    def schema_version(self) -> int:
        """Return the schema version stored in the database."""
        with self._guard():
            row = self._conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0])

    def _now(self) -> float:
        return self._clock().timestamp()

    # -- entries --------------------------------------------------------------------

    def _ensure(
        self, conn: sqlite3.Connection, mailbox: str, uid: str, now: float
    ) -> None:
        # A write for an entry never begun still records (key as the engine makes it).
        conn.execute(
            "INSERT INTO entries (mailbox, uid, key, status, first_seen, updated) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (mailbox, uid) DO NOTHING",
            (mailbox, uid, message_key(mailbox, uid), Status.PENDING.value, now, now),
        )

    def owed(self, mailbox: str) -> list[str]:
        """Return the uids whose DELE is still owed (``delete_due``)."""
        with self._guard():
            rows = self._conn.execute(  # the first term selects the partial index
                "SELECT uid FROM entries WHERE mailbox = ? "
                "AND (status = 'pending' OR delete_due = 1) AND delete_due = 1",
                (mailbox,),
            ).fetchall()
        return [row[0] for row in rows]

    def unfinished(self, mailbox: str) -> list[str]:
        """Return the uids PENDING or owing an acknowledgement (MP-05)."""
        with self._guard():
            rows = self._conn.execute(  # literal: matches the partial index
                "SELECT uid FROM entries WHERE mailbox = ? "
                "AND (status = 'pending' OR delete_due = 1)",
                (mailbox,),
            ).fetchall()
        return [row[0] for row in rows]

    def retained(self, mailbox: str) -> dict[str, int]:
        """Return uid → size of every entry not DELETED (mail believed on the server)."""
        with self._guard():
            rows = self._conn.execute(
                "SELECT uid, size FROM entries WHERE mailbox = ? AND status <> ?",
                (mailbox, Status.DELETED.value),
            ).fetchall()
        return {uid: int(size) for uid, size in rows}

    def get_many(self, mailbox: str, uids: Iterable[str]) -> dict[str, Entry]:
        """Return the entries of ``uids`` that exist, by uid."""
        with self._guard():
            return self._select(self._conn, mailbox, uids)

    def _select(
        self, conn: sqlite3.Connection, mailbox: str, uids: Iterable[str]
    ) -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        for chunk in iter_chunks(uids):
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT {ENTRY_COLUMNS} FROM entries "
                f"WHERE mailbox = ? AND uid IN ({marks})",
                (mailbox, *chunk),
            ).fetchall()
            for row in rows:
                found[row[1]] = entry(row, _time)
        return found

    def begin(self, mailbox: str, uid: str, *, key: str, size: int) -> Entry:
        """Insert a PENDING entry if absent; return the current entry."""
        return self.begin_many(mailbox, [(uid, key, size)])[uid]

    def begin_many(
        self, mailbox: str, items: Sequence[tuple[str, str, int]]
    ) -> dict[str, Entry]:
        """:meth:`begin` for each ``(uid, key, size)`` in one transaction (issue 18:
        one statement for all, one select); return the current entries by uid."""
        now = self._now()
        pending = Status.PENDING.value
        rows = [(mailbox, uid, key, pending, size, now, now) for uid, key, size in items]
        with self._tx() as conn:
            inserted = conn.executemany(
                "INSERT INTO entries "
                "(mailbox, uid, key, status, size, first_seen, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (mailbox, uid) DO NOTHING",
                rows,
            ).rowcount
            if inserted != len(rows):  # some existed (or came twice): read them all
                return self._select(conn, mailbox, [row[1] for row in rows])
        # Every row is new, and each entry is what was inserted: no need to read it.
        when = _time(now)
        return {
            uid: Entry(mailbox=mailbox, uid=uid, key=key, status=Status.PENDING,
                       size=size, first_seen=when, updated=when)
            for _, uid, key, _, size, _, _ in rows
        }

    def step_committed(self, mailbox: str, uid: str, step: str) -> None:
        """Record that chain step ``step`` durably committed for this message."""
        self.steps_committed(mailbox, [(uid, step)])

    def steps_committed(self, mailbox: str, items: Iterable[tuple[str, str]]) -> None:
        """:meth:`step_committed` for each ``(uid, step)`` in order, in one
        transaction (one statement for all, issue 18)."""
        now = self._now()
        pending = Status.PENDING.value
        rows = [
            (mailbox, uid, message_key(mailbox, uid), pending, step, now, now, step, step)
            for uid, step in items
        ]
        with self._tx() as conn:
            # Begun if absent, the step appended once.
            conn.executemany(
                "INSERT INTO entries AS e "
                "(mailbox, uid, key, status, steps, first_seen, updated) "
                "VALUES (?, ?, ?, ?, json_array(?), ?, ?) "
                "ON CONFLICT (mailbox, uid) DO UPDATE "
                "SET steps = json_insert(e.steps, '$[#]', ?), updated = excluded.updated "
                "WHERE NOT EXISTS (SELECT 1 FROM json_each(e.steps) WHERE value = ?)",
                rows,
            )

    def finish(
        self,
        mailbox: str,
        uid: str,
        *,
        status: Status,
        disposition: str,
        sha256: str | None,
        reason: str = "",
        delete_due: bool,
        fence: Fence | None = None,
    ) -> None:
        """Set the final status of a chain run; ``sha256=None`` keeps a known hash.

        With ``fence``: only while it is the mailbox's lease (see :meth:`batch`)."""
        with self._fenced(fence):
            self.finish_many(
                mailbox, [Finish(uid, status, disposition, sha256, reason, delete_due)]
            )

    def finish_many(self, mailbox: str, items: Iterable[Finish]) -> None:
        """:meth:`finish` for each item in order, in one transaction (one statement
        for all, issue 18)."""
        now = self._now()
        rows = [
            (mailbox, f.uid, message_key(mailbox, f.uid), Status(f.status).value,
             f.disposition, f.sha256, f.reason, int(f.delete_due), now, now)
            for f in items
        ]
        with self._tx() as conn:
            # An entry never begun is recorded as finished.
            conn.executemany(
                "INSERT INTO entries AS e (mailbox, uid, key, status, disposition, "
                "sha256, reason, delete_due, first_seen, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (mailbox, uid) DO UPDATE SET status = excluded.status, "
                "disposition = excluded.disposition, "
                "sha256 = COALESCE(excluded.sha256, e.sha256), "
                "reason = excluded.reason, delete_due = excluded.delete_due, "
                "updated = excluded.updated",
                rows,
            )

    def fail(self, mailbox: str, uid: str, *, error: str, counted: bool) -> int:
        """Record a failed attempt (``counted`` adds one); return the attempts."""
        now = self._now()
        with self._tx() as conn:
            self._ensure(conn, mailbox, uid, now)
            (attempts,) = conn.execute(
                "UPDATE entries "
                "SET attempts = attempts + ?, last_error = ?, updated = ? "
                "WHERE mailbox = ? AND uid = ? RETURNING attempts",
                (int(counted), error, now, mailbox, uid),
            ).fetchone()
        return int(attempts)

    def mark_deleted(
        self, mailbox: str, uids: Iterable[str], *, fence: Fence | None = None
    ) -> None:
        """After QUIT +OK: ``uids`` are gone; status DELETED, delete_due False.

        With ``fence``: only while it is the mailbox's lease (see :meth:`batch`)."""
        now = self._now()
        with self._fenced(fence), self._tx() as conn:
            for chunk in iter_chunks(uids):
                marks = ",".join("?" * len(chunk))
                conn.execute(
                    "UPDATE entries SET status = ?, delete_due = 0, updated = ? "
                    f"WHERE mailbox = ? AND uid IN ({marks})",
                    (Status.DELETED.value, now, mailbox, *chunk),
                )

    def list(
        self,
        mailbox: str | None = None,
        status: Status | None = None,
        limit: int = 1000,
    ) -> list[Entry]:
        """Return entries, newest (by first_seen) first, optionally filtered."""
        where: list[str] = []
        params: list[Any] = []
        if mailbox is not None:
            where.append("mailbox = ?")
            params.append(mailbox)
        if status is not None:
            where.append("status = ?")
            params.append(Status(status).value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._guard():
            rows = self._conn.execute(
                f"SELECT {ENTRY_COLUMNS} FROM entries {clause} "
                "ORDER BY first_seen DESC, rowid DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [entry(row, _time) for row in rows]

    def forget(
        self, mailbox: str, uids: Iterable[str] | None = None, *, cursors: bool = True
    ) -> int:
        """Delete entries (the whole mailbox when ``uids`` is None); count them."""
        removed = 0
        with self._tx() as conn:
            if cursors:
                # MP-05: a forgotten message under a cursor must be listed again.
                conn.execute("DELETE FROM cursors WHERE mailbox = ?", (mailbox,))
            if uids is None:
                removed = conn.execute(
                    "DELETE FROM entries WHERE mailbox = ?", (mailbox,)
                ).rowcount
            else:
                for chunk in iter_chunks(uids):
                    marks = ",".join("?" * len(chunk))
                    removed += conn.execute(
                        f"DELETE FROM entries WHERE mailbox = ? AND uid IN ({marks})",
                        (mailbox, *chunk),
                    ).rowcount
        return removed

    def mark_seen(self, mailbox: str, items: Iterable[tuple[str, str, int]]) -> int:
        """Adopt (uid, key, size) items as KEPT, unprocessed; return how many new."""
        now = self._now()
        added = 0
        with self._tx() as conn:
            for uid, key, size in items:
                added += conn.execute(
                    "INSERT INTO entries (mailbox, uid, key, status, size, "
                    "disposition, reason, first_seen, updated) "
                    "VALUES (?, ?, ?, ?, ?, 'keep', 'seen', ?, ?) "
                    "ON CONFLICT (mailbox, uid) DO NOTHING",
                    (mailbox, uid, key, Status.KEPT.value, size, now, now),
                ).rowcount
        return added

    def prune(
        self, mailbox: str, present: Iterable[str], older_than_days: float
    ) -> int:
        """Drop DELETED entries gone from the server and older than the limit.

        Reads first, outside a write transaction: a mailbox with nothing to drop (the
        usual case) takes no write lock and commits nothing (issue 18: one prune per
        mailbox in every ``run --once``). The DELETE checks status and age again under
        the write lock, so an entry changed in between is kept. Still a write: a
        journal closed or refusing work (``_closed``) raises, nothing to drop or not."""
        on_server = set(present)
        cutoff = (self._clock() - timedelta(days=older_than_days)).timestamp()
        deleted = Status.DELETED.value
        with self._guard():
            if self._closed:  # as _tx: e.g. full sync not restored (never at NORMAL)
                raise JournalError(f"journal {self.path} is closed")
            rows = self._conn.execute(
                "SELECT uid FROM entries "
                "WHERE mailbox = ? AND status = ? AND updated < ?",
                (mailbox, deleted, cutoff),
            ).fetchall()
        doomed = [uid for (uid,) in rows if uid not in on_server]
        if not doomed:
            return 0
        removed = 0
        with self._tx() as conn:
            for chunk in iter_chunks(doomed):
                marks = ",".join("?" * len(chunk))
                removed += conn.execute(
                    "DELETE FROM entries WHERE mailbox = ? AND status = ? "
                    f"AND updated < ? AND uid IN ({marks})",
                    (mailbox, deleted, cutoff, *chunk),
                ).rowcount
        return removed

    # -- poll records ---------------------------------------------------------------

    def record_poll(
        self,
        mailbox: str,
        *,
        owner: str,
        error: str = "",
        error_type: str = "",
        backlog: int | None = None,
        next_poll: datetime | None = None,
    ) -> None:
        """Upsert ``mailbox``'s poll record (see :class:`PollRecord`)."""
        params = poll_params(
            mailbox, owner, self._now(), error=error, error_type=error_type,
            backlog=backlog, next_poll=next_poll.timestamp() if next_poll is not None else None,
        )
        with self._tx() as conn:
            conn.execute(poll_upsert("polls", "?"), params)

    def polls(self) -> dict[str, PollRecord]:
        """Return the poll record of every mailbox that has one, by mailbox."""
        with self._guard():
            rows = self._conn.execute(f"SELECT {POLL_COLUMNS} FROM polls").fetchall()
        return {row[0]: poll_record(row, _time) for row in rows}

    def oldest_pending(self) -> dict[str, datetime]:
        """Return, per mailbox, the ``first_seen`` of its oldest PENDING entry."""
        with self._guard():
            rows = self._conn.execute(
                "SELECT mailbox, min(first_seen) FROM entries "
                "WHERE status = ? GROUP BY mailbox",
                (Status.PENDING.value,),
            ).fetchall()
        return {mailbox: _time(first) for mailbox, first in rows}

    def close(self) -> None:
        """Roll back an open batch, release the locks and close the database."""
        with self._lock:
            if self._shut:
                return
            self._shut = self._closed = True
            for _owner, fd in self._locks.values():
                if fd is not None:
                    os.close(fd)
            self._locks.clear()
            self._epochs.clear()
            self._taken.clear()
            self._conn.close()

    def __enter__(self) -> SqliteJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqliteJournal({str(self.path)!r})"
