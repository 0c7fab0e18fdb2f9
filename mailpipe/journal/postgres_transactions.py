"""PostgresTransactions: the PostgreSQL journal's connection, transactions and batches.

Every journal method commits before it returns (each is one autocommit statement,
atomic on its own), except inside :meth:`PostgresTransactions.batch` (one transaction,
committed at exit, rolled back on an exception; inner batches are savepoints; a batch
with a fence commits only while the lease row holds it). An outermost
``batch(synced=False)`` commits with ``synchronous_commit`` off (MP-08): the server
does not wait for its WAL flush, and a later synchronous commit flushes it with its own.
The main connection is reconnected when it broke outside a batch; inside one, the
batch fails.

Contract: :class:`PostgresTransactions` is the base of
:class:`~mailpipe.journal.postgres.PostgresJournal` (never used alone); the journal's
``__init__`` sets the state declared on the class. Every psycopg error inside
:meth:`PostgresTransactions._translate` leaves as JournalError, its text redacted (libpq
may quote a password).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import structlog

from mailpipe.journal.base import Fence, fenced_commit, verify_fence
from mailpipe.journal.errors import JournalError
from mailpipe.pgtls import secure_dsn
from mailpipe.secrets import redact

if TYPE_CHECKING:
    import psycopg

log = structlog.get_logger()


class PostgresTransactions:
    """The connection and transactions of :class:`~mailpipe.journal.postgres.PostgresJournal`."""

    # Set by PostgresJournal.__init__.
    dsn: str
    schema: str | None
    _connect_timeout: float
    _lock: threading.RLock
    _depth: int  # nesting of the open batch, 0 when none
    _relaxed: bool  # the open batch commits with synchronous_commit off (MP-08)
    _transactions: list[Any]  # the open batch's psycopg transactions, outermost first
    _closed: bool
    _conn: psycopg.Connection[tuple[Any, ...]]

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
    def batch(self, *, fence: Fence | None = None, synced: bool = True) -> Iterator[None]:
        """Group commit: one transaction for every write inside, committed at exit.

        Re-entrant: an inner batch is a savepoint, rolled back alone on its exception.
        With ``fence``, the transaction (or savepoint) commits only while the lease row
        holds ``fence``'s owner and epoch, read ``FOR SHARE`` as its last statement (a
        take-over then waits for the commit); else FencedError, rolled back.

        ``synced=False`` (MP-08), when no batch is open in the journal (of any thread):
        ``SET LOCAL synchronous_commit TO OFF`` (the commit returns before the server's
        WAL flush; a server crash can lose it, never keep a later synchronous commit
        without it), and the connection lock is held for the whole block, so no other
        thread's write joins it (the block must not wait for another thread that uses
        the journal). Inside an open batch, its own or another thread's, it is a
        savepoint like any other: that batch's commit (or rollback) decides. A synced
        batch inside an unsynced one raises JournalError: its durability could not be
        kept.
        """
        if synced:
            if self._relaxed:
                # Another thread waits here for the unsynced batch to end, then goes
                # on; only the thread inside it still finds it set.
                with self._lock:
                    if self._relaxed:
                        raise JournalError(
                            "PostgreSQL journal: a synced batch inside an unsynced one"
                        )
            with self._batch(fence, synced=True):
                yield
            return
        with self._lock:
            outer = not self._depth
            if outer:
                self._relaxed = True
            try:
                with self._batch(fence, synced=not outer):
                    yield
            finally:
                if outer:
                    self._relaxed = False

    @contextmanager
    def _batch(self, fence: Fence | None, *, synced: bool) -> Iterator[None]:
        """:meth:`batch`'s transaction or savepoint; ``synced=False``: the outermost
        transaction of an unsynced batch."""
        with self._guard():
            tx = self._live().transaction()
            tx.__enter__()
            self._transactions.append(tx)
            self._depth += 1
        try:
            if not synced:
                with self._guard():
                    self._live().execute("SET LOCAL synchronous_commit TO OFF")
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
