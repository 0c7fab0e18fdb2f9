"""Review 18: store.sqlite group commit when the buffer limit triggers a commit in
process() and that commit fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailpipe import TemporaryFailure
from tests.plugins.test_store_sqlite import connect, make_message, parsed, rows, store


def test_failed_early_commit_in_process_fails_the_next_flush(tmp_path: Path) -> None:
    """m1's process() returned (its write buffered); m2's process() hits MAX_ROWS and
    the group write fails (database busy). m1 is not stored, so the next flush() must
    fail: the engine's Chain.flushed() only counts flush() failures, and a flush()
    that succeeds tells the ledger m1 is durable -> finish + DELE -> m1 lost."""
    s = store(tmp_path, busy_timeout="0.1s")  # group_commit: the default
    s.MAX_ROWS = 2
    m1 = parsed(make_message("1", "one", "body"))
    s.process(m1)  # returns: buffered
    blocker = connect(tmp_path / "db" / "mail.sqlite3")
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(TemporaryFailure):
            s.process(parsed(make_message("2", "two", "body")))  # early commit fails
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    try:
        with pytest.raises(TemporaryFailure):
            s.flush()  # m1 was never written: this flush must not succeed
    finally:
        stored = rows(tmp_path, "SELECT key FROM messages")
        s.close()
    assert stored == [], stored
