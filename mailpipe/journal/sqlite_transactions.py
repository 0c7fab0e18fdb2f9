"""SqliteTransactions: the SQLite journal's connection lock, transactions and batches.

Durability: every journal method commits before it returns (``BEGIN IMMEDIATE`` …
``COMMIT``; with WAL and ``synchronous=FULL`` a commit survives power loss), except
inside :meth:`SqliteTransactions.batch`, where one transaction covers every write of
the block and commits at exit (rolled back on an exception). Batches nest as
savepoints; a batch with a fence commits only while the fence is the mailbox's lease
epoch. An outermost ``batch(synced=False)`` commits at ``synchronous=NORMAL`` (no
fsync; MP-08): it survives a process crash, and becomes durable with the next synced
commit, whose WAL sync covers every frame before it.

Threads: one connection (``check_same_thread=False``) guarded by a lock, so the
engine may call from the event loop and from ``asyncio.to_thread``. A batch belongs to
the journal, not to a thread: writes from any thread while a batch is open join it.

Contract: :class:`SqliteTransactions` is the base of
:class:`~mailpipe.journal.sqlite.SqliteJournal` (never used alone); the journal's
``__init__`` opens the connection and sets the state declared on the class. Every
sqlite3 error inside :meth:`SqliteTransactions._guard` leaves as JournalError.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path

from mailpipe.journal.base import Fence, fenced_commit, verify_fence
from mailpipe.journal.errors import JournalError


class SqliteTransactions:
    """The connection and transactions of :class:`~mailpipe.journal.sqlite.SqliteJournal`."""

    # Set by SqliteJournal.__init__.
    path: Path
    _lock: threading.RLock
    _conn: sqlite3.Connection
    _closed: bool  # refusing work (closed, or full sync not restored)
    _depth: int  # nesting of the open batch, 0 when none
    _relaxed: bool  # the open batch commits unsynced (MP-08)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Hold the connection lock; turn sqlite3 errors into JournalError."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise JournalError(f"journal {self.path}: {exc}") from exc

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One durable transaction, or a part of the open batch."""
        with self._guard():
            if self._closed:
                raise JournalError(f"journal {self.path} is closed")
            if self._depth:
                yield self._conn
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self, savepoint: str | None = None) -> None:
        """Roll back the open transaction (or to ``savepoint``) if there still is one:
        SQLite ends it by itself on SQLITE_FULL or SQLITE_IOERR, and a ROLLBACK then
        ("cannot rollback - no transaction is active") would hide the real error."""
        if not self._conn.in_transaction:
            return
        if savepoint is None:
            self._conn.execute("ROLLBACK")
        else:
            self._conn.execute(f"ROLLBACK TO {savepoint}")
            self._conn.execute(f"RELEASE {savepoint}")

    @contextmanager
    def batch(self, *, fence: Fence | None = None, synced: bool = True) -> Iterator[None]:
        """Group commit: one transaction for every write inside, committed at exit.

        Re-entrant: an inner batch is a savepoint, rolled back alone on its exception.
        With ``fence``, the transaction (or savepoint) commits only while ``fence`` is
        the mailbox's lease epoch; checked under the write lock (``BEGIN IMMEDIATE``),
        so no take-over can slip in before the commit. Else FencedError, rolled back.

        ``synced=False`` (MP-08), when no batch is open in the journal (of any thread):
        the transaction commits without fsync (``synchronous=NORMAL``, FULL again after
        it), and the connection lock is held for the whole block, so no other thread's
        write can join a commit that is not synced (the block must not wait for another
        thread that uses the journal). Inside an open batch, its own or another
        thread's, it is a savepoint like any other: that batch's commit (or rollback)
        decides. A synced batch inside an unsynced one raises JournalError: its
        durability could not be kept.
        """
        if synced:
            if self._relaxed:
                # Another thread waits here for the unsynced batch to end, then goes
                # on; only the thread inside it still finds it set.
                with self._lock:
                    if self._relaxed:
                        raise JournalError(
                            f"journal {self.path}: a synced batch inside an unsynced one"
                        )
            with self._batch(fence):
                yield
            return
        with self._unsynced():  # the lock held throughout; NORMAL when outermost
            outer = not self._depth
            if outer:
                self._relaxed = True
            try:
                with self._batch(fence):
                    yield
            finally:
                if outer:
                    self._relaxed = False

    @contextmanager
    def _batch(self, fence: Fence | None) -> Iterator[None]:
        """:meth:`batch`'s transaction or savepoint."""
        with self._guard():
            if self._closed:
                raise JournalError(f"journal {self.path} is closed")
            depth = self._depth + 1
            savepoint = f"batch_{depth}"
            self._conn.execute(
                "BEGIN IMMEDIATE" if depth == 1 else f"SAVEPOINT {savepoint}"
            )
            self._depth = depth
        try:
            yield
            if fence is not None:
                with self._guard(), fenced_commit(fence):
                    self._verify(fence)
        except BaseException:
            with self._guard():
                try:
                    self._rollback(None if depth == 1 else savepoint)
                finally:
                    self._depth = depth - 1
            raise
        with self._guard():
            try:
                self._conn.execute("COMMIT" if depth == 1 else f"RELEASE {savepoint}")
            except BaseException:
                if depth == 1:
                    self._rollback()
                raise
            finally:
                self._depth = depth - 1

    @contextmanager
    def _unsynced(self) -> Iterator[None]:
        """Commit the block's own transaction without fsync (``synchronous=NORMAL``,
        then FULL again); inside an open batch the batch's commit decides. Holds the
        connection lock for the block.

        Used for two kinds of write whose loss in an OS crash or power loss leaves a
        state recovery already handles, and which every later synced commit makes
        durable (its WAL sync covers the frames before it). A process crash loses
        nothing (the frames are in the OS's cache).

        - The lease epoch (:class:`~mailpipe.journal.sqlite_leases.SqliteLeases`): it
          need not survive what ends every holder of this machine-local journal's
          flocks, and no fenced write can be durable without the epoch it was
          checked against.
        - An outermost ``batch(synced=False)`` (MP-08): see :meth:`batch`.
        """
        with self._guard():
            relaxed = not self._depth
            if relaxed:
                if self._closed:
                    raise JournalError(f"journal {self.path} is closed")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                yield
            except BaseException:
                if relaxed:
                    with suppress(Exception):  # the block's own error is the one to see
                        self._full_sync_again()
                raise
            if relaxed:
                self._full_sync_again()

    def _full_sync_again(self) -> None:
        """Back to ``synchronous=FULL`` after an unsynced block. A transaction the block
        could not end (its COMMIT and ROLLBACK both failed) is rolled back first: the
        setting cannot change inside one, and it would hold the write lock against
        every other process. If that fails too, the journal refuses all further work
        (it never writes on at NORMAL) and its connection is closed, which ends the
        transaction and releases the lock."""
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            self._conn.execute("PRAGMA synchronous=FULL")
        except BaseException:
            self._closed = True
            self._conn.close()
            raise

    def _fenced(self, fence: Fence | None) -> AbstractContextManager[None]:
        return nullcontext() if fence is None else self.batch(fence=fence)

    def _verify(self, fence: Fence) -> None:
        row = self._conn.execute(
            "SELECT owner, epoch FROM leases WHERE mailbox = ?", (fence.mailbox,)
        ).fetchone()
        verify_fence(fence, row)

    def check_fence(self, fence: Fence) -> None:
        """Raise FencedError unless ``fence`` is the mailbox's current lease epoch."""
        with self._guard():
            self._verify(fence)
