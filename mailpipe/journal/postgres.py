"""PostgresJournal: the shared journal for several workers that split many mailboxes.

Same semantics as the SQLite journal: every method commits before it returns (each is
one autocommit statement, atomic on its own), except inside
:meth:`PostgresJournal.batch` (one transaction, committed at exit, rolled back on an
exception; inner batches are savepoints).

Mailbox leases (epochs, fences, take-over): :mod:`mailpipe.journal.postgres_leases`,
whose :class:`~mailpipe.journal.postgres_leases.PostgresLeases` this class is built
on. The schema and its migrations: :mod:`mailpipe.journal.postgres_schema`.

psycopg (3) is imported when a journal is created, so the core works without it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog

from mailpipe.journal.base import (
    Entry,
    Fence,
    Finish,
    PollRecord,
    Status,
    check_schema,
    fenced_commit,
    verify_fence,
)
from mailpipe.journal.errors import JournalError
from mailpipe.journal.postgres_leases import RELEASE, PostgresLeases
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
from mailpipe.pgtls import secure_dsn
from mailpipe.secrets import redact

if TYPE_CHECKING:
    import psycopg

log = structlog.get_logger()


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)



class PostgresJournal(PostgresLeases):
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

    # -- connections and schema -----------------------------------------------------

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg
        from psycopg import sql

        try:
            conn = psycopg.connect(
                secure_dsn(self.dsn),
                autocommit=True,
                connect_timeout=max(1, round(self._connect_timeout)),
            )
        except psycopg.Error as exc:
            raise JournalError(  # libpq may quote a malformed password: redact
                redact(f"cannot connect to the PostgreSQL journal: {exc}")
            ) from exc
        if self.schema:
            conn.execute(
                sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema))
            )
        return conn

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

    def _live(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The main connection; reconnected when it broke outside a transaction."""
        if self._closed:
            raise JournalError("PostgreSQL journal is closed")
        if self._conn.broken or self._conn.closed:
            if self._depth:
                raise JournalError("PostgreSQL journal connection lost inside a batch")
            self._conn = self._connect()
            log.warning("journal_reconnected", schema=self.schema)
        return self._conn

    # -- transactions ---------------------------------------------------------------

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """Turn psycopg errors into JournalError."""
        import psycopg

        try:
            yield
        except psycopg.Error as exc:
            raise JournalError(redact(f"PostgreSQL journal: {exc}")) from exc

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Hold the connection lock; turn psycopg errors into JournalError."""
        with self._lock, self._translate():
            yield

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """The connection for one write: a single autocommit statement (atomic and
        durable on return), or a part of the open batch."""
        with self._guard():
            yield self._live()

    @contextmanager
    def batch(self, *, fence: Fence | None = None) -> Iterator[None]:
        """Group commit: one transaction for every write inside, committed at exit.

        Re-entrant: an inner batch is a savepoint, rolled back alone on its exception.
        With ``fence``, the transaction (or savepoint) commits only while the lease row
        holds ``fence``'s owner and epoch, read ``FOR SHARE`` as its last statement (a
        take-over then waits for the commit); else FencedError, rolled back.
        """
        with self._guard():
            tx = self._live().transaction()
            tx.__enter__()
            self._transactions.append(tx)
            self._depth += 1
        try:
            yield
            if fence is not None:
                with self._guard(), fenced_commit(fence):
                    self._verify(fence, lock=True)
        except BaseException as exc:
            with self._guard():
                self._depth -= 1
                self._transactions.pop()
                tx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        with self._guard():
            self._depth -= 1
            self._transactions.pop()
            tx.__exit__(None, None, None)

    def _fenced(self, fence: Fence | None) -> AbstractContextManager[None]:
        return nullcontext() if fence is None else self.batch(fence=fence)

    def _verify(self, fence: Fence, *, lock: bool) -> None:
        row = (
            self._live()
            .execute(
                "SELECT owner, epoch FROM mailpipe_leases WHERE mailbox = %s"
                + (" FOR SHARE" if lock else ""),
                (fence.mailbox,),
            )
            .fetchone()
        )
        verify_fence(fence, row)

    def check_fence(self, fence: Fence) -> None:
        """Raise FencedError unless ``fence`` is the mailbox's current lease epoch."""
        with self._guard():
            self._verify(fence, lock=False)

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
                _lock_cursors(conn, mailbox)
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

    def cursors(self, mailbox: str) -> dict[str, int]:
        """Return the listing cursors of ``mailbox``, by scope."""
        with self._guard():
            rows = (
                self._live()
                .execute(
                    "SELECT scope, position FROM mailpipe_cursors WHERE mailbox = %s",
                    (mailbox,),
                )
                .fetchall()
            )
        return {scope: int(position) for scope, position in rows}

    def set_cursors(
        self,
        mailbox: str,
        cursors: Mapping[str, int],
        *,
        expect: Mapping[str, int] | None = None,
        passed: Iterable[str] = (),
        fence: Fence | None = None,
    ) -> bool:
        """Replace the listing cursors of ``mailbox`` with ``cursors``; with
        ``expect``, compare-and-set in one transaction: the mailbox's cursor lock
        (which :meth:`forget` takes too, so a concurrent forget runs wholly before or
        after this), then the passed entries ``FOR SHARE``."""
        with self.batch(fence=fence), self._tx() as conn:
            _lock_cursors(conn, mailbox)
            if expect is not None:
                current = dict(conn.execute(
                    "SELECT scope, position FROM mailpipe_cursors WHERE mailbox = %s "
                    "FOR UPDATE",
                    (mailbox,),
                ).fetchall())
                if current != dict(expect):
                    return False
                wanted = sorted(set(passed))
                if wanted:
                    rows = conn.execute(
                        "SELECT uid FROM mailpipe_journal WHERE mailbox = %s "
                        "AND uid = ANY(%s) AND NOT delete_due "
                        "AND status = ANY(%s) FOR SHARE",
                        (mailbox, wanted, [Status.COMMITTED.value, Status.KEPT.value,
                                           Status.QUARANTINED.value,
                                           Status.DELETED.value]),
                    ).fetchall()
                    if len(rows) != len(wanted):
                        return False
            conn.execute("DELETE FROM mailpipe_cursors WHERE mailbox = %s", (mailbox,))
            if cursors:
                conn.execute(
                    "INSERT INTO mailpipe_cursors (mailbox, scope, position) "
                    "SELECT %s, c.scope, c.position "
                    "FROM unnest(%s::text[], %s::bigint[]) AS c(scope, position)",
                    (mailbox, list(cursors), [int(v) for v in cursors.values()]),
                )
        return True

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


#: The advisory-lock namespace of the cursor lock (``"mp"``), beside ``hashtext``.
_CURSOR_LOCK_SPACE: Final = 0x6D70


def _lock_cursors(conn: Any, mailbox: str) -> None:
    """Take ``mailbox``'s cursor lock until the transaction ends (MP-05): set_cursors
    and forget serialise on it, each taking it before any row of its own."""
    conn.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_CURSOR_LOCK_SPACE, mailbox)
    )


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
