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


def test_prepared_rows_held_before_flush_are_bounded_by_max_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAX_HELD (8 MB, "bounds peak RSS") counts raw + text + html only: attachment
    text (up to extract.max_chars = 200 000 per attachment, any number of them) is held
    twice per message (the record JSON and attachment_text) and never counted, so up
    to MAX_ROWS = 512 such messages are kept in memory until flush()."""
    from mailpipe.plugins.store import sqlite as sqlite_store

    real = sqlite_store.message_document

    def with_attachment_text(message, **kw):  # type: ignore[no-untyped-def]
        doc = real(message, **kw)
        doc["attachments"] = [{"index": 0, "filename": "a.pdf", "size": 1,
                               "sha256": "x", "text": "y" * 200_000}]
        return doc

    monkeypatch.setattr(sqlite_store, "message_document", with_attachment_text)
    s = store(tmp_path, raw="none")
    for i in range(100):
        s.process(parsed(make_message(str(i), f"m{i}", "body")))
    held = sum(
        sum(len(v) for v in r.message if isinstance(v, str)) for r in s._rows.values()
    )
    s.close()
    assert held <= s.MAX_HELD + 1_000_000, f"{held} octets of rows held before flush()"
