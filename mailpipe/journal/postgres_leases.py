"""PostgresLeases: the mailbox leases of the PostgreSQL journal (epochs, fences).

Mailbox locks are leases in ``mailpipe_leases(mailbox, owner, expires_at, epoch)``, taken
with an upsert that succeeds only when the row is absent, expired or already ours, and
timed by the server's clock (``clock_timestamp()``) so workers on several machines
agree. A dead worker's mailbox is taken over by another once its lease expires;
``renew_mailbox`` extends only while the row still names the owner and epoch. Every take
raises ``epoch`` (a release expires the row instead of deleting it, so epochs are never
reused): a batch with a fence (:meth:`~mailpipe.journal.postgres.PostgresJournal.batch`)
commits only while the row still holds that epoch, checked in the same transaction with
the row locked ``FOR SHARE`` until the commit, so a take-over waits for the commit or
the commit is refused. Leases use their own autocommit connection, so they are never
held back by an open batch (only a take-over waits for a fenced commit in progress).

Contract: :class:`PostgresLeases` is the lease layer of
:class:`~mailpipe.journal.postgres.PostgresJournal` (never used alone), on its
connection and transactions; the journal's ``__init__`` sets the state declared on the
class, and its ``close`` releases the leases still held here (:data:`RELEASE`) and
closes the lease connection.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import UTC
from typing import TYPE_CHECKING, Any, Final

import structlog

from mailpipe.journal.base import Fence, Lease
from mailpipe.journal.errors import JournalError
from mailpipe.journal.postgres_transactions import PostgresTransactions

if TYPE_CHECKING:
    import psycopg

log = structlog.get_logger()

# Releases a lease: the row stays (expired) so that epochs only ever grow.
RELEASE: Final = (
    "UPDATE mailpipe_leases SET expires_at = '-infinity' "
    "WHERE mailbox = %s AND owner = %s AND expires_at > '-infinity'"
)


class PostgresLeases(PostgresTransactions):
    """The mailbox leases of :class:`~mailpipe.journal.postgres.PostgresJournal`."""

    # Set by PostgresJournal.__init__.
    _lease_lock: threading.Lock
    _leases: dict[str, tuple[str, int]]  # mailbox -> (owner, epoch)
    _lease_conn: psycopg.Connection[tuple[Any, ...]] | None

    def leases(self, mailboxes: Iterable[str]) -> dict[str, Lease]:
        """Return the unexpired leases of ``mailboxes`` (server clock), by mailbox."""
        with self._guard():
            rows = (
                self._live()
                .execute(
                    "SELECT mailbox, owner, expires_at FROM mailpipe_leases "
                    "WHERE mailbox = ANY(%s) AND expires_at > clock_timestamp()",
                    (list(mailboxes),),
                )
                .fetchall()
            )
        return {
            mailbox: Lease(mailbox=mailbox, owner=owner, expires=expires.astimezone(UTC))
            for mailbox, owner, expires in rows
        }

    def _lease_connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._closed:
            raise JournalError("PostgreSQL journal is closed")
        conn = self._lease_conn
        if conn is None or conn.broken or conn.closed:
            conn = self._lease_conn = self._connect()
        return conn

    def lock_mailbox(self, mailbox: str, *, owner: str, ttl: float) -> bool:
        """Take the lease on ``mailbox`` for ``ttl`` seconds; False if another holds it.

        Succeeds when no lease exists, the lease expired (a dead worker's), or ``owner``
        already holds it (then it is extended); each success raises the epoch.
        """
        with self._lease_lock, self._translate():
            row = (
                self._lease_connection()
                .execute(
                    "INSERT INTO mailpipe_leases AS l (mailbox, owner, expires_at, "
                    "epoch) VALUES "
                    "(%s, %s, clock_timestamp() + make_interval(secs => %s), 1) "
                    "ON CONFLICT (mailbox) DO UPDATE "
                    "SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at, "
                    "epoch = l.epoch + 1 "
                    "WHERE l.expires_at < clock_timestamp() "
                    "OR l.owner = EXCLUDED.owner "
                    "RETURNING l.epoch",
                    (mailbox, owner, float(ttl)),
                )
                .fetchone()
            )
            if row is None:
                return False
            self._leases[mailbox] = (owner, int(row[0]))
        log.debug("mailbox_locked", mailbox=mailbox, owner=owner, ttl=ttl,
                  epoch=int(row[0]))
        return True

    def fence(self, mailbox: str, *, owner: str) -> Fence | None:
        """The fence of the lease ``owner`` took on ``mailbox`` here (no I/O)."""
        with self._lease_lock:
            held = self._leases.get(mailbox)
        if held is None or held[0] != owner:
            return None
        return Fence(mailbox=mailbox, owner=owner, epoch=held[1])

    def renew_mailbox(self, mailbox: str, *, owner: str, ttl: float) -> bool:
        """Extend the lease by ``ttl`` from now if ``owner`` still holds it (not
        released; with the epoch it took here, when it took it here)."""
        with self._lease_lock, self._translate():
            held = self._leases.get(mailbox)
            epoch = held[1] if held is not None and held[0] == owner else None
            row = (
                self._lease_connection()
                .execute(
                    "UPDATE mailpipe_leases "
                    "SET expires_at = clock_timestamp() + make_interval(secs => %s) "
                    "WHERE mailbox = %s AND owner = %s AND expires_at > '-infinity' "
                    "AND (%s::bigint IS NULL OR epoch = %s::bigint) RETURNING owner",
                    (float(ttl), mailbox, owner, epoch, epoch),
                )
                .fetchone()
            )
            if row is None:
                self._leases.pop(mailbox, None)
                log.warning("mailbox_lease_lost", mailbox=mailbox, owner=owner)
                return False
        return True

    def unlock_mailbox(self, mailbox: str, *, owner: str) -> None:
        """Release the lease if ``owner`` holds it (the row stays, expired, so the
        next take raises its epoch)."""
        with self._lease_lock, self._translate():
            self._lease_connection().execute(RELEASE, (mailbox, owner))
            if mailbox in self._leases and self._leases[mailbox][0] == owner:
                del self._leases[mailbox]
        log.debug("mailbox_unlocked", mailbox=mailbox, owner=owner)
