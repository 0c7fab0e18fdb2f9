"""The per-sender auto-reply budget behind ``loopguard``: how many automatic answers a
sender got within a window, kept in a small SQLite file so restarts and several
workers on one host share it."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (sender TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS replies_sender_at ON replies (sender, at);
"""


class ReplyBudget:
    """At most ``limit`` answers per sender within ``window`` seconds.

    :meth:`take` is atomic (one SQLite transaction under ``BEGIN IMMEDIATE``), so two
    workers never both take a sender's last answer. Senders are compared case-folded.
    """

    def __init__(self, path: Path, *, limit: int, window: float) -> None:
        self.path, self.limit, self.window = path, limit, window
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.executescript(_SCHEMA)

    def take(self, sender: str, now: float | None = None) -> bool:
        """Count one answer to ``sender`` and return True, or return False (nothing
        counted) when the sender used up the budget of the window."""
        at = time.time() if now is None else now
        key = sender.casefold()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM replies WHERE at < ?", (at - self.window,))
                (used,) = self._db.execute(
                    "SELECT count(*) FROM replies WHERE sender = ?", (key,)
                ).fetchone()
                allowed = used < self.limit
                if allowed:
                    self._db.execute("INSERT INTO replies VALUES (?, ?)", (key, at))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return bool(allowed)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
