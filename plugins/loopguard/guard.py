"""The per-sender auto-reply budget behind ``loopguard``: how many distinct messages
of a sender were let through to an automatic answer within a window, kept in a small
SQLite file so restarts and several workers on one host share it."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

_TABLE = "CREATE TABLE IF NOT EXISTS replies (sender TEXT NOT NULL, at REAL NOT NULL)"
# `key` came later: a file from before it gains the column (its old rows, key NULL,
# still count until they leave the window).
_INDEXES = """
CREATE INDEX IF NOT EXISTS replies_sender_at ON replies (sender, at);
CREATE UNIQUE INDEX IF NOT EXISTS replies_sender_key ON replies (sender, key);
"""


class ReplyBudget:
    """At most ``limit`` messages per sender answered within ``window`` seconds.

    What is counted is distinct messages (by message key), not runs: a message run
    again (a later step failed temporarily, a crash, a replay) passes without being
    counted again. :meth:`take` is atomic (one SQLite transaction under ``BEGIN
    IMMEDIATE``), so two workers never both take a sender's last answer. Senders are
    compared case-folded.
    """

    def __init__(self, path: Path, *, limit: int, window: float) -> None:
        self.path, self.limit, self.window = path, limit, window
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(_TABLE)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(replies)")}
            if "key" not in columns:
                self._db.execute("ALTER TABLE replies ADD COLUMN key TEXT")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.executescript(_INDEXES)

    def take(self, sender: str, message_key: str, now: float | None = None) -> bool:
        """Return True when message ``message_key`` of ``sender`` may be answered:
        it was counted already within the window, or it is counted now. Return False
        (nothing counted) when other messages of the sender used up the window."""
        at = time.time() if now is None else now
        who = sender.casefold()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM replies WHERE at < ?", (at - self.window,))
                counted = self._db.execute(
                    "SELECT 1 FROM replies WHERE sender = ? AND key = ?",
                    (who, message_key),
                ).fetchone()
                (used,) = self._db.execute(
                    "SELECT count(*) FROM replies WHERE sender = ?", (who,)
                ).fetchone()
                allowed = counted is not None or used < self.limit
                if allowed:
                    self._db.execute(
                        "INSERT OR IGNORE INTO replies (sender, at, key) VALUES (?, ?, ?)",
                        (who, at, message_key),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return bool(allowed)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
