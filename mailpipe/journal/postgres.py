"""PostgresJournal: the shared journal for several workers that split many mailboxes.

Same semantics as the SQLite journal: every method commits before it returns, except
inside :meth:`PostgresJournal.batch` (one transaction, committed at exit): see
:mod:`mailpipe.journal.postgres_transactions` (connection, transactions, batches,
fenced commits). The class is built in layers:
:class:`~mailpipe.journal.postgres_transactions.PostgresTransactions`, then
:class:`~mailpipe.journal.postgres_leases.PostgresLeases` (mailbox leases: epochs,
fences, take-over), and :class:`~mailpipe.journal.postgres_cursors.PostgresCursors` (listing
cursors), then the entries and poll records here. The
schema and its migrations: :mod:`mailpipe.journal.postgres_schema`.

psycopg (3) is imported when a journal is created, so the core works without it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog

from mailpipe.journal.base import (
    Entry,
    Fence,
    Finish,
    PollRecord,
    Status,
    check_schema,
)
from mailpipe.journal.postgres_cursors import PostgresCursors, lock_cursors
from mailpipe.journal.postgres_leases import RELEASE, PostgresLeases
from mailpipe.journal.postgres_schema import MIGRATIONS as MIGRATIONS  # its former home
from mailpipe.journal.postgres_schema import SCHEMA_VERSION, migrate, stored_version
from mailpipe.journal.rows import (
    ENTRY_COLUMNS,
    POLL_COLUMNS,
    entry,
    poll_params,
    poll_record,
    poll_upsert,
)
from mailpipe.message import message_key

if TYPE_CHECKING:
    import psycopg

log = structlog.get_logger()


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)



class PostgresJournal(PostgresLeases, PostgresCursors):
    """The shared :class:`~mailpipe.journal.base.Journal` in PostgreSQL.

    ``dsn`` is a libpq connection string or URL. ``schema`` (created when missing) holds
    the tables; by default the connection's search_path decides. ``clock`` returns the
    current UTC time for entry timestamps (tests); leases use the server's clock.
    ``read_only`` (``mailpipe status``): the session's transactions are READ ONLY and
    the schema is checked, never created or migrated (JournalMissingError when it has
    no tables yet, SchemaOutdatedError when older than this code's).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        connect_timeout: float = 10.0,
        clock: Callable[[], datetime] = _utcnow,
        read_only: bool = False,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._lock = threading.RLock()
        self._lease_lock = threading.Lock()
        self._depth = 0
        self._relaxed = False
        self._transactions: list[Any] = []
        self._leases: dict[str, tuple[str, int]] = {}  # mailbox -> (owner, epoch)
        self._closed = False
        self._lease_conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._conn = self._connect()
        if not read_only:
            self._migrate()
            return
        try:
            self._check_schema()
        except BaseException:
            self._conn.close()
            raise

    def _check_schema(self) -> None:
        conn = self._conn
        with self._translate():
            conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            version = stored_version(conn)
        check_schema(
            version,
            latest=SCHEMA_VERSION,
            where="PostgreSQL journal" + (f" (schema {self.schema})" if self.schema else ""),
        )

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> PostgresJournal:
        """Open from a URL; its ``schema`` query parameter becomes ``schema``."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        schema = next((value for name, value in query if name == "schema"), None)
        rest = urlencode([(name, value) for name, value in query if name != "schema"])
        return cls(urlunsplit(parts._replace(query=rest)), schema=schema, **kwargs)

    # -- schema ---------------------------------------------------------------------

    def _migrate(self) -> None:
        conn = self._conn
        with self._guard(), conn.transaction():
            current = migrate(conn, self.schema)
        if current != SCHEMA_VERSION:
            log.info(
                "journal_migrated",
                schema=self.schema,
                from_version=current,
                to_version=SCHEMA_VERSION,
            )

    def schema_version(self) -> int:
        """Return the schema version stored in the database."""
        with self._guard():
            row = (
                self._live()
                .execute("SELECT version FROM mailpipe_schema_version")
                .fetchone()
            )
        assert row is not None
        return int(row[0])

    # -- entries --------------------------------------------------------------------

    def owed(self, mailbox: str) -> list[str]:
        """Return the uids whose DELE is still owed (``delete_due``)."""
        with self._guard():
            rows = (
                self._live()
                .execute(
                    "SELECT uid FROM mailpipe_journal "
                    "WHERE mailbox = %s AND delete_due",
                    (mailbox,),
                )
                .fetchall()
            )
        return [row[0] for row in rows]

    def unfinished(self, mailbox: str) -> list[str]:
        """Return the uids PENDING or owing an acknowledgement (MP-05)."""
        with self._guard():
            rows = (
                self._live()
                .execute(
                    "SELECT uid FROM mailpipe_journal "
                    "WHERE mailbox = %s AND (status = 'pending' OR delete_due)",
                    (mailbox,),
                )
                .fetchall()
            )
        return [row[0] for row in rows]

    def retained(self, mailbox: str) -> dict[str, int]:
        """Return uid → size of every entry not DELETED (mail believed on the server)."""
        with self._guard():
            rows = (
                self._live()
                .execute(
                    "SELECT uid, size FROM mailpipe_journal "
                    "WHERE mailbox = %s AND status <> 'deleted'",
                    (mailbox,),
                )
                .fetchall()
            )
        return {uid: int(size) for uid, size in rows}

    def get_many(self, mailbox: str, uids: Iterable[str]) -> dict[str, Entry]:
        """Return the entries of ``uids`` that exist, by uid."""
        with self._guard():
            rows = (
                self._live()
                .execute(
                    f"SELECT {ENTRY_COLUMNS} FROM mailpipe_journal "
                    "WHERE mailbox = %s AND uid = ANY(%s)",
                    (mailbox, list(uids)),
                )
                .fetchall()
            )
        return {row[1]: entry(row, _utc) for row in rows}

    def begin(self, mailbox: str, uid: str, *, key: str, size: int) -> Entry:
        """Insert a PENDING entry if absent; return the current entry."""
        now = self._clock()
        select = (
            f"SELECT {ENTRY_COLUMNS} FROM mailpipe_journal WHERE mailbox = %s AND uid = %s"
        )
        with self._tx() as conn:
            row = conn.execute(
                "WITH ins AS (INSERT INTO mailpipe_journal "
                "(mailbox, uid, key, status, size, first_seen, updated) "
                "VALUES (%s, %s, %s, 'pending', %s, %s, %s) "
                f"ON CONFLICT (mailbox, uid) DO NOTHING RETURNING {ENTRY_COLUMNS}) "
                f"SELECT {ENTRY_COLUMNS} FROM ins UNION ALL "
                f"{select} AND NOT EXISTS (SELECT 1 FROM ins)",
                (mailbox, uid, key, size, now, now, mailbox, uid),
            ).fetchone()
            if row is None:  # inserted concurrently after this statement's snapshot
                row = conn.execute(select, (mailbox, uid)).fetchone()
        assert row is not None
        return entry(row, _utc)

    def begin_many(
        self, mailbox: str, items: Sequence[tuple[str, str, int]]
    ) -> dict[str, Entry]:
        """:meth:`begin` for each ``(uid, key, size)`` in one statement (issue 18);
        return the current entries by uid."""
        rows = list(items)
        with self._tx() as conn:
            self._insert_absent(conn, mailbox, rows, Status.PENDING, None, "")
            return self.get_many(mailbox, [uid for uid, _, _ in rows])

    def _insert_absent(
        self,
        conn: psycopg.Connection[tuple[Any, ...]],
        mailbox: str,
        rows: list[tuple[str, str, int]],
        status: Status,
        disposition: str | None,
        reason: str,
    ) -> int:
        """Insert an entry for each ``(uid, key, size)`` not in the journal yet (first
        seen now), in one statement; return how many were new."""
        now = self._clock()
        return conn.execute(
            "INSERT INTO mailpipe_journal (mailbox, uid, key, status, size, "
            "disposition, reason, first_seen, updated) "
            "SELECT %s, u.uid, u.key, %s, u.size, %s, %s, %s, %s "
            "FROM unnest(%s::text[], %s::text[], %s::bigint[]) "
            "AS u(uid, key, size) ON CONFLICT (mailbox, uid) DO NOTHING",
            (
                mailbox,
                status.value,
                disposition,
                reason,
                now,
                now,
                [uid for uid, _, _ in rows],
                [key for _, key, _ in rows],
                [size for _, _, size in rows],
            ),
        ).rowcount

    def step_committed(self, mailbox: str, uid: str, step: str) -> None:
        """Record that chain step ``step`` durably committed for this message."""
        self.steps_committed(mailbox, [(uid, step)])

    def steps_committed(self, mailbox: str, items: Iterable[tuple[str, str]]) -> None:
        """:meth:`step_committed` for each ``(uid, step)`` in order, in one
        transaction (inside a batch: part of it)."""
        now = self._clock()
        rows = [(mailbox, uid, message_key(mailbox, uid), step, now, now)
                for uid, step in items]
        with self._tx() as conn:
            _execute_many(
                conn,
                "INSERT INTO mailpipe_journal AS j "
                "(mailbox, uid, key, status, steps, first_seen, updated) "
                "VALUES (%s, %s, %s, 'pending', jsonb_build_array(%s::text), %s, %s) "
                "ON CONFLICT (mailbox, uid) DO UPDATE "
                "SET steps = j.steps || EXCLUDED.steps, updated = EXCLUDED.updated "
                "WHERE NOT j.steps @> EXCLUDED.steps",
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
        """:meth:`finish` for each item in order, in one transaction (inside a batch:
        part of it)."""
        now = self._clock()
        rows = [
            (mailbox, f.uid, message_key(mailbox, f.uid), Status(f.status).value,
             f.disposition, f.sha256, f.reason, f.delete_due, now, now)
            for f in items
        ]
        with self._tx() as conn:
            _execute_many(
                conn,
                "INSERT INTO mailpipe_journal AS j (mailbox, uid, key, status, "
                "disposition, sha256, reason, delete_due, first_seen, updated) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (mailbox, uid) DO UPDATE SET status = EXCLUDED.status, "
                "disposition = EXCLUDED.disposition, "
                "sha256 = COALESCE(EXCLUDED.sha256, j.sha256), "
                "reason = EXCLUDED.reason, delete_due = EXCLUDED.delete_due, "
                "updated = EXCLUDED.updated",
                rows,
            )

    def fail(self, mailbox: str, uid: str, *, error: str, counted: bool) -> int:
        """Record a failed attempt (``counted`` adds one); return the attempts."""
        now = self._clock()
        with self._tx() as conn:
            row = conn.execute(
                "INSERT INTO mailpipe_journal AS j (mailbox, uid, key, status, "
                "attempts, last_error, first_seen, updated) "
                "VALUES (%s, %s, %s, 'pending', %s, %s, %s, %s) "
                "ON CONFLICT (mailbox, uid) DO UPDATE "
                "SET attempts = j.attempts + EXCLUDED.attempts, "
                "last_error = EXCLUDED.last_error, updated = EXCLUDED.updated "
                "RETURNING attempts",
                (
                    mailbox,
                    uid,
                    message_key(mailbox, uid),
                    int(counted),
                    error,
                    now,
                    now,
                ),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def mark_deleted(
        self, mailbox: str, uids: Iterable[str], *, fence: Fence | None = None
    ) -> None:
        """After QUIT +OK: ``uids`` are gone; status DELETED, delete_due False.

        With ``fence``: only while it is the mailbox's lease (see :meth:`batch`)."""
        now = self._clock()
        with self._fenced(fence), self._tx() as conn:
            conn.execute(
                "UPDATE mailpipe_journal "
                "SET status = 'deleted', delete_due = false, "
                "updated = %s WHERE mailbox = %s AND uid = ANY(%s)",
                (now, mailbox, list(uids)),
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
            where.append("mailbox = %s")
            params.append(mailbox)
        if status is not None:
            where.append("status = %s")
            params.append(Status(status).value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._guard():
            rows = (
                self._live()
                .execute(
                    f"SELECT {ENTRY_COLUMNS} FROM mailpipe_journal {clause} "
                    "ORDER BY first_seen DESC, seq DESC LIMIT %s",
                    (*params, limit),
                )
                .fetchall()
            )
        return [entry(row, _utc) for row in rows]

    def forget(
        self, mailbox: str, uids: Iterable[str] | None = None, *, cursors: bool = True
    ) -> int:
        """Delete entries (the whole mailbox when ``uids`` is None); count them."""
        with self.batch(), self._tx() as conn:
            if cursors:
                # MP-05: a forgotten message under a cursor must be listed again
                # (one transaction with the entries, serialised with set_cursors by
                # the mailbox's cursor lock: under READ COMMITTED a DELETE waiting
                # on the cursor rows would not see the rows that commit inserts).
                lock_cursors(conn, mailbox)
                conn.execute(
                    "DELETE FROM mailpipe_cursors WHERE mailbox = %s", (mailbox,)
                )
            if uids is None:
                return conn.execute(
                    "DELETE FROM mailpipe_journal WHERE mailbox = %s", (mailbox,)
                ).rowcount
            return conn.execute(
                "DELETE FROM mailpipe_journal WHERE mailbox = %s AND uid = ANY(%s)",
                (mailbox, list(uids)),
            ).rowcount

    def mark_seen(self, mailbox: str, items: Iterable[tuple[str, str, int]]) -> int:
        """Adopt (uid, key, size) items as KEPT, unprocessed; return how many new."""
        with self._tx() as conn:
            return self._insert_absent(conn, mailbox, list(items), Status.KEPT, "keep", "seen")

    def prune(
        self, mailbox: str, present: Iterable[str], older_than_days: float
    ) -> int:
        """Drop DELETED entries gone from the server and older than the limit."""
        cutoff = self._clock() - timedelta(days=older_than_days)
        with self._tx() as conn:
            return conn.execute(
                "DELETE FROM mailpipe_journal "
                "WHERE mailbox = %s AND status = 'deleted' "
                "AND updated < %s AND NOT (uid = ANY(%s))",
                (mailbox, cutoff, list(present)),
            ).rowcount

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
            mailbox, owner, self._clock(), error=error, error_type=error_type,
            backlog=backlog, next_poll=next_poll,
        )
        with self._tx() as conn:
            conn.execute(poll_upsert("mailpipe_polls", "%s", alias="p"), params)

    def polls(self) -> dict[str, PollRecord]:
        """Return the poll record of every mailbox that has one, by mailbox."""
        with self._guard():
            rows = (
                self._live()
                .execute(f"SELECT {POLL_COLUMNS} FROM mailpipe_polls")
                .fetchall()
            )
        return {row[0]: poll_record(row, _utc) for row in rows}

    def oldest_pending(self) -> dict[str, datetime]:
        """Return, per mailbox, the ``first_seen`` of its oldest PENDING entry."""
        with self._guard():
            rows = (
                self._live()
                .execute(
                    "SELECT mailbox, min(first_seen) FROM mailpipe_journal "
                    "WHERE status = 'pending' GROUP BY mailbox"
                )
                .fetchall()
            )
        return {mailbox: first.astimezone(UTC) for mailbox, first in rows}

    def close(self) -> None:
        """Roll back an open batch, release the leases taken here, close connections."""
        with self._lock, self._lease_lock:
            if self._closed:
                return
            try:
                conn = self._lease_conn
                if self._leases and conn is not None and not conn.broken:
                    for mailbox, (owner, _epoch) in self._leases.items():
                        conn.execute(RELEASE, (mailbox, owner))
            finally:
                self._closed = True
                self._leases.clear()
                if self._lease_conn is not None:
                    self._lease_conn.close()
                self._conn.close()

    def __enter__(self) -> PostgresJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresJournal(schema={self.schema!r})"


def _execute_many(
    conn: psycopg.Connection[tuple[Any, ...]], sql: str, rows: list[tuple[Any, ...]]
) -> None:
    """Run ``sql`` once per row: a single row as one (autocommit) statement, more in
    one transaction (a savepoint inside a batch), pipelined by psycopg."""
    if len(rows) == 1:
        conn.execute(sql, rows[0])
    elif rows:
        with conn.transaction():
            conn.cursor().executemany(sql, rows)
