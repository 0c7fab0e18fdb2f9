"""PostgresCursors: the PostgreSQL journal's listing cursors (MP-05).

A cursor is a source's per-scope watermark (IMAP: a folder under its UIDVALIDITY),
one row of ``mailpipe_cursors`` per scope. :meth:`PostgresCursors.set_cursors`
compares and sets in one transaction: the mailbox's cursor lock first
(:func:`lock_cursors`, which ``forget`` takes too, so a concurrent forget runs wholly
before or after it), then the cursor rows ``FOR UPDATE`` and the passed entries
``FOR SHARE``.

Contract: :class:`PostgresCursors` is the cursor layer of
:class:`~mailpipe.journal.postgres.PostgresJournal` (never used alone), on its
transactions; see :meth:`mailpipe.journal.base.Journal.set_cursors`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from mailpipe.journal.base import Fence, Status
from mailpipe.journal.postgres_transactions import PostgresTransactions

#: The advisory-lock namespace of the cursor lock (``"mp"``), beside ``hashtext``.
CURSOR_LOCK_SPACE: Final = 0x6D70


def lock_cursors(conn: Any, mailbox: str) -> None:
    """Take ``mailbox``'s cursor lock until the transaction ends (MP-05): set_cursors
    and forget serialise on it, each taking it before any row of its own."""
    conn.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (CURSOR_LOCK_SPACE, mailbox)
    )


class PostgresCursors(PostgresTransactions):
    """The listing cursors of :class:`~mailpipe.journal.postgres.PostgresJournal`."""

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
            lock_cursors(conn, mailbox)
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
