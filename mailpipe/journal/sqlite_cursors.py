"""SqliteCursors: the SQLite journal's listing cursors (MP-05).

A cursor is a source's per-scope watermark (IMAP: a folder under its UIDVALIDITY),
one row of ``cursors`` per scope. :meth:`SqliteCursors.set_cursors` compares and sets
under the write lock (``BEGIN IMMEDIATE``), so no other write of the journal comes
between the comparison and the write.

Contract: :class:`SqliteCursors` is the cursor layer of
:class:`~mailpipe.journal.sqlite.SqliteJournal` (never used alone), on its
transactions; see :meth:`mailpipe.journal.base.Journal.set_cursors`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mailpipe.journal.base import Fence, Status, iter_chunks
from mailpipe.journal.sqlite_transactions import SqliteTransactions


class SqliteCursors(SqliteTransactions):
    """The listing cursors of :class:`~mailpipe.journal.sqlite.SqliteJournal`."""

    def cursors(self, mailbox: str) -> dict[str, int]:
        """Return the listing cursors of ``mailbox``, by scope."""
        with self._guard():
            rows = self._conn.execute(
                "SELECT scope, position FROM cursors WHERE mailbox = ?", (mailbox,)
            ).fetchall()
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
        ``expect``, compare-and-set under the write lock (``BEGIN IMMEDIATE``)."""
        with self._fenced(fence), self._tx() as conn:
            if expect is not None:
                current = dict(conn.execute(
                    "SELECT scope, position FROM cursors WHERE mailbox = ?", (mailbox,)
                ).fetchall())
                if current != dict(expect):
                    return False
                done = (Status.COMMITTED.value, Status.KEPT.value,
                        Status.QUARANTINED.value, Status.DELETED.value)
                wanted = sorted(set(passed))
                for chunk in iter_chunks(wanted):
                    marks = ",".join("?" * len(chunk))
                    (count,) = conn.execute(
                        f"SELECT COUNT(*) FROM entries WHERE mailbox = ? "
                        f"AND uid IN ({marks}) AND delete_due = 0 "
                        "AND status IN (?, ?, ?, ?)",
                        (mailbox, *chunk, *done),
                    ).fetchone()
                    if count != len(chunk):
                        return False
            conn.execute("DELETE FROM cursors WHERE mailbox = ?", (mailbox,))
            conn.executemany(
                "INSERT INTO cursors (mailbox, scope, position) VALUES (?, ?, ?)",
                [(mailbox, scope, int(pos)) for scope, pos in cursors.items()],
            )
        return True
