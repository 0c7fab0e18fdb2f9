"""store.sqlite against a real SQLite database: FTS, upsert, migrations, group commit."""

from __future__ import annotations

import email.policy
import json
import sqlite3
from email.message import EmailMessage
from pathlib import Path

import pytest
from mailpipe.plugins.parse import parse_into
from mailpipe.plugins.store import _sqlite_schema as sqlite_schema
from mailpipe.plugins.store import sqlite as sqlite_store
from mailpipe.plugins.store.sqlite import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SqliteOptions,
    SqliteStore,
    connect,
    migrate,
    open_raw,
    schema_version,
    search,
)

from mailpipe import Message, PermanentFailure, ProcessorContext, TemporaryFailure
from mailpipe.plugin_manager import load


def make_message(
    uid: str, subject: str, body: str, *, attachment: bytes | None = None
) -> Message:
    msg = EmailMessage()
    msg["From"] = "Alice Example <alice@example.com>"
    msg["To"] = "Bob <bob@example.org>"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uid}@example.com>"
    msg["Date"] = "Fri, 28 Nov 2025 10:00:00 +0100"
    msg.set_content(body)
    if attachment is not None:
        msg.add_attachment(
            attachment, maintype="application", subtype="pdf", filename="report.pdf"
        )
    raw = msg.as_bytes(policy=email.policy.SMTP)
    return Message.from_bytes(raw, mailbox="support", uid=uid)


def parsed(message: Message) -> Message:
    parse_into(message)
    return message


def store(tmp_path: Path, **options: object) -> SqliteStore:
    opts = SqliteOptions.model_validate({"path": "db/mail.sqlite3", **options})
    s = SqliteStore(opts, ProcessorContext(base_dir=tmp_path))
    s.open()
    return s


def rows(tmp_path: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(tmp_path / "db" / "mail.sqlite3")
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def test_all_store_processors_are_registered_and_commit() -> None:
    _, registry = load(entry_points=False)
    for name in ("store.sqlite", "store.maildir", "store.mbox", "store.attachments",
                 "store.jsonl"):
        cls = registry.processor(name)
        assert cls.commits is True


def test_connections_keep_wal_full_sync_and_temporary_storage_in_memory(
    tmp_path: Path,
) -> None:
    """Issue 18: the FTS triggers give every upsert of a group commit a statement
    journal, which spilled to temporary files (about 11 writes a message); in memory
    it is the same rollback of one statement, and crash recovery is still the WAL's."""
    conn = connect(tmp_path / "mail.sqlite3")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    finally:
        conn.close()


def test_fts_finds_a_message_by_body_word_subject_and_address(tmp_path: Path) -> None:
    s = store(tmp_path)
    a = parsed(make_message("1", "Quarterly figures", "The pelican report is late."))
    b = parsed(make_message("2", "Lunch", "Shall we meet at noon?"))
    s.process(a)
    s.process(b)
    s.close()
    conn = connect(tmp_path / "db" / "mail.sqlite3")
    assert search(conn, "pelican") == [a.key]
    assert search(conn, "subject:lunch") == [b.key]
    assert sorted(search(conn, "alice")) == sorted([a.key, b.key])
    assert search(conn, "walrus") == []
    conn.close()


def test_upsert_twice_keeps_one_row_and_its_first_stored_at(tmp_path: Path) -> None:
    s = store(tmp_path)
    m = parsed(make_message("1", "Hello", "first body", attachment=b"%PDF-1.4 x"))
    m.tags.add("invoice")
    s.process(m)
    s.flush()  # group commit (the default): durable at flush, as the engine calls it
    first = rows(tmp_path, "SELECT stored_at FROM messages")
    assert len(first) == 1
    m.tags.add("paid")
    s.process(m)
    s.close()
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(1,)]
    assert rows(tmp_path, "SELECT stored_at FROM messages") == first
    assert rows(tmp_path, "SELECT tag FROM tags ORDER BY tag") == [("invoice",), ("paid",)]
    assert rows(tmp_path, "SELECT idx, filename, content_type, size FROM attachments") == [
        (0, "report.pdf", "application/pdf", 10)
    ]
    conn = connect(tmp_path / "db" / "mail.sqlite3")
    assert search(conn, "first") == [m.key]  # the index holds the row once
    conn.close()


def test_record_columns_and_inline_raw(tmp_path: Path) -> None:
    s = store(tmp_path)
    m = parsed(make_message("7", "Columns", "body text"))
    s.process(m)
    s.close()
    (row,) = rows(
        tmp_path,
        "SELECT key, mailbox, uid, sha256, size, parsed, message_id, date, subject, "
        "from_addresses, r.raw, record FROM messages JOIN message_raw r USING (key)",
    )
    assert row[:7] == (m.key, "support", "7", m.sha256, m.size, 1, "7@example.com")
    assert str(row[7]).startswith("2025-11-28T09:00:00")
    assert row[8] == "Columns"
    assert json.loads(str(row[9])) == [{"name": "Alice Example", "address": "alice@example.com"}]
    assert row[10] == m.raw
    record = json.loads(str(row[11]))
    assert record["key"] == m.key and "text" not in record


def test_raw_none_stores_no_bytes(tmp_path: Path) -> None:
    s = store(tmp_path, raw="none")
    s.process(parsed(make_message("1", "x", "y")))
    s.close()
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(1,)]
    assert rows(tmp_path, "SELECT count(*) FROM message_raw") == [(0,)]


def test_without_parse_a_minimal_row_is_searchable(tmp_path: Path) -> None:
    s = store(tmp_path)
    m = make_message("1", "Raw only", "The heron sleeps.")
    s.process(m)
    s.close()
    assert rows(
        tmp_path,
        "SELECT parsed, uid, sha256, r.raw, subject FROM messages JOIN message_raw r "
        "USING (key)",
    ) == [(0, "1", m.sha256, m.raw, "Raw only")]
    conn = connect(tmp_path / "db" / "mail.sqlite3")
    assert search(conn, "heron") == [m.key]
    conn.close()


def test_migrates_a_version_1_database_and_indexes_old_rows(tmp_path: Path) -> None:
    path = tmp_path / "db" / "mail.sqlite3"
    path.parent.mkdir()
    conn = connect(path)
    assert migrate(conn, target=1) == 1
    conn.execute(
        "INSERT INTO messages (key, mailbox, uid, sha256, size, parsed, subject, "
        "from_addresses, text, record, stored_at, updated_at) "
        "VALUES ('k1', 'support', '1', 'ab', 3, 1, 'Old news', "
        "'[{\"name\": \"Carol Old\", \"address\": \"carol@example.net\"}]', "
        "'an ancient ostrich', '{}', 'then', 'then')"
    )
    conn.close()

    s = store(tmp_path)
    s.process(parsed(make_message("2", "New", "a modern ostrich")))
    s.close()

    conn = connect(path)
    assert schema_version(conn) == SCHEMA_VERSION == MIGRATIONS[-1][0]
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version")] == [
        1, 2, 3, 4, 5
    ]
    assert conn.execute("SELECT addresses FROM messages WHERE key = 'k1'").fetchone() == (
        "Carol Old carol@example.net",
    )
    assert search(conn, "ancient") == ["k1"]
    assert search(conn, "carol") == ["k1"]
    assert len(search(conn, "ostrich")) == 2
    conn.close()


def test_migration_4_indexes_attachment_text_and_keeps_old_rows_searchable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db" / "mail.sqlite3"
    path.parent.mkdir()
    conn = connect(path)
    assert migrate(conn, target=3) == 3
    assert "attachment_text" not in {r[1] for r in conn.execute(
        "PRAGMA table_info(messages)")}
    conn.execute(
        "INSERT INTO messages (key, mailbox, uid, sha256, size, parsed, subject, "
        "from_addresses, addresses, text, record, stored_at, updated_at) "
        "VALUES ('k1', 'support', '1', 'ab', 3, 1, 'Old walrus', '[]', "
        "'carol@example.net', 'an ancient ostrich', '{}', 'then', 'then')"
    )
    conn.commit()
    conn.close()

    s = store(tmp_path)  # opening migrates 3 -> 4
    message = parsed(make_message("2", "New", "see the scan", attachment=b"%PDF-1.4"))
    assert message.record is not None
    message.record.attachments[0].text = "quarterly zebra invoice"
    s.process(message)
    s.close()

    conn = connect(path)
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version")] == [
        1, 2, 3, 4, 5
    ]
    assert search(conn, "ancient") == search(conn, "walrus") == ["k1"]  # old row kept
    assert search(conn, "carol") == ["k1"]
    assert search(conn, "zebra") == [message.key]  # only in the attachment text
    assert search(conn, "scan") == [message.key]
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    conn.execute("DELETE FROM messages WHERE key = ?", (message.key,))
    assert search(conn, "zebra") == []  # the delete trigger removed its terms
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    conn.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db" / "mail.sqlite3"
    path.parent.mkdir()
    conn = connect(path)
    migrate(conn)
    conn.execute(
        "INSERT INTO schema_version VALUES (?, 'from the future', 'later')",
        (SCHEMA_VERSION + 1,),
    )
    conn.close()
    s = SqliteStore(SqliteOptions(path=path), ProcessorContext(base_dir=tmp_path))
    with pytest.raises(PermanentFailure, match="newer"):
        s.open()


def test_group_commit_is_durable_only_after_flush(tmp_path: Path) -> None:
    s = store(tmp_path, group_commit=True)
    messages = [parsed(make_message(str(i), f"m{i}", "grouped body")) for i in range(3)]
    for m in messages:
        s.process(m)
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]  # not yet visible
    s.flush()
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(3,)]
    s.process(parsed(make_message("9", "late", "after flush")))
    s.close()  # close commits what is open
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(4,)]


def test_group_commit_failed_message_does_not_spoil_the_group(tmp_path: Path) -> None:
    s = store(tmp_path, group_commit=True)
    good = parsed(make_message("1", "good", "body"))
    s.process(good)
    bad = parsed(make_message("2", "bad", "body", attachment=b"%PDF"))
    bad.record.attachments.append(bad.record.attachments[0])  # duplicate (key, idx)
    with pytest.raises(PermanentFailure, match="UNIQUE constraint failed"):
        s.process(bad)  # refused by the checks before it is buffered: nothing written
    s.flush()
    assert rows(tmp_path, "SELECT key FROM messages") == [(good.key,)]
    assert rows(tmp_path, "SELECT count(*) FROM attachments") == [(0,)]
    s.close()


@pytest.mark.parametrize("group_commit", [False, True])
def test_busy_database_is_a_temporary_failure(tmp_path: Path, group_commit: bool) -> None:
    s = store(tmp_path, busy_timeout="0.1s", group_commit=group_commit)
    blocker = connect(tmp_path / "db" / "mail.sqlite3")
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(TemporaryFailure):
            s.process(parsed(make_message("1", "x", "y")))
            s.flush()  # group commit: the write lock is taken only here
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]
    s.flush()  # a failed group is not written later by accident
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]
    s.process(parsed(make_message("1", "x", "y")))  # succeeds once the lock is gone
    if group_commit:  # the key of a failed group is written in process() next time
        assert rows(tmp_path, "SELECT count(*) FROM messages") == [(1,)]
    s.close()
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(1,)]


def test_group_commit_holds_no_lock_before_flush(tmp_path: Path) -> None:
    """Several workers share one store: between flushes a grouping store holds no
    write lock, so another writer is never kept waiting for a whole group."""
    s = store(tmp_path)
    s.process(parsed(make_message("1", "x", "y")))
    other = connect(tmp_path / "db" / "mail.sqlite3", timeout=0.1)
    other.execute("BEGIN IMMEDIATE")  # would raise "database is locked"
    other.execute("ROLLBACK")
    other.close()
    s.flush()
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(1,)]
    s.close()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    opts = SqliteOptions(path=Path("db/mail.sqlite3"))
    s = SqliteStore(opts, ProcessorContext(base_dir=tmp_path, dry_run=True))
    s.process(parsed(make_message("1", "x", "y")))
    s.close()
    assert not (tmp_path / "db").exists()


def _version_2_database(path: Path) -> None:
    """A version 2 database holding one message with raw bytes and one without."""
    path.parent.mkdir()
    conn = connect(path)
    assert migrate(conn, target=2) == 2
    for key, subject, raw in (("k1", "kept bytes", b"Subject: kept\r\n\r\n\x00\xff"),
                              ("k2", "no bytes", None)):
        conn.execute(
            "INSERT INTO messages (key, mailbox, uid, sha256, size, parsed, subject, "
            "text, record, raw, stored_at, updated_at) "
            "VALUES (?, 'support', ?, 'ab', 3, 1, ?, 'an old walrus', '{}', ?, 'then', "
            "'then')",
            (key, key, subject, raw),
        )
    conn.close()


def test_migration_3_moves_raw_into_its_own_table_and_keeps_every_row(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db" / "mail.sqlite3"
    _version_2_database(path)
    conn = connect(path)
    assert migrate(conn) == SCHEMA_VERSION == 5
    assert migrate(conn) == 5  # idempotent
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version")] == [
        1, 2, 3, 4, 5
    ]
    columns = [r[1] for r in conn.execute("PRAGMA table_info(messages)")]
    assert "raw" not in columns
    assert [r[1] for r in conn.execute("PRAGMA table_info(message_raw)")][-1] == "raw"
    assert conn.execute(
        "SELECT key, subject, stored_at FROM messages ORDER BY key"
    ).fetchall() == [("k1", "kept bytes", "then"), ("k2", "no bytes", "then")]
    assert conn.execute("SELECT key, raw FROM message_raw").fetchall() == [
        ("k1", b"Subject: kept\r\n\r\n\x00\xff")
    ]
    blob = open_raw(conn, "k1")
    assert blob is not None
    with blob:
        assert blob.read() == b"Subject: kept\r\n\r\n\x00\xff"
    assert open_raw(conn, "k2") is None
    assert sorted(search(conn, "walrus")) == ["k1", "k2"]  # the index survived
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.execute("DELETE FROM messages WHERE key = 'k1'")  # bytes go with their row
    assert conn.execute("SELECT count(*) FROM message_raw").fetchone() == (0,)
    conn.close()


def test_a_failed_migration_3_leaves_version_2_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db" / "mail.sqlite3"
    _version_2_database(path)
    version, description, steps = MIGRATIONS[2]
    broken = (version, description, (*steps, "SELECT no_such_function()"))
    # _migrate (in _sqlite_schema) reads MIGRATIONS there, not in store.sqlite.
    monkeypatch.setattr(sqlite_schema, "MIGRATIONS", (*MIGRATIONS[:2], broken))
    conn = connect(path)
    with pytest.raises(sqlite3.OperationalError, match="no_such_function"):
        migrate(conn)
    assert schema_version(conn) == 2
    assert conn.execute("SELECT key, raw FROM messages ORDER BY key").fetchall() == [
        ("k1", b"Subject: kept\r\n\r\n\x00\xff"), ("k2", None)
    ]
    assert conn.execute(
        "SELECT 1 FROM sqlite_master WHERE name = 'message_raw'"
    ).fetchall() == []
    monkeypatch.undo()
    assert migrate(conn) == 5  # the next open migrates
    conn.close()


def test_restoring_a_message_replaces_its_raw_bytes_and_none_removes_them(
    tmp_path: Path,
) -> None:
    first = make_message("1", "Hello", "first body")
    second = Message.from_bytes(first.raw + b"more\r\n", mailbox="support", uid="1")
    s = store(tmp_path)
    s.process(first)
    s.process(second)
    s.close()
    assert rows(tmp_path, "SELECT key, raw FROM message_raw") == [(first.key, second.raw)]
    s = store(tmp_path, raw="none")
    s.process(second)
    s.close()
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(1,)]
    assert rows(tmp_path, "SELECT count(*) FROM message_raw") == [(0,)]


def test_failed_early_commit_in_process_fails_the_next_flush(tmp_path: Path) -> None:
    """m1's process() returned (its write buffered); m2's process() hits MAX_ROWS and
    the group write fails (database busy). m1 is not stored, so the next flush() must
    fail: the engine's Chain.flushed() only counts flush() failures, and a flush()
    that succeeds tells the ledger m1 is durable -> finish + DELE -> m1 lost."""
    s = store(tmp_path, busy_timeout="0.1s", writer="thread")  # group_commit: default
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


def test_a_failed_chunk_of_the_writer_process_fails_the_next_flush(
    tmp_path: Path,
) -> None:
    """writer = "process" (the default): m2's process() reaches CHUNK_ROWS and hands
    the chunk {m1, m2} to the writer process, which cannot commit it (database busy).
    Both process() calls returned, so the next flush() must raise (MP-04), nothing of
    the chunk is stored, and each key is then written alone, durable when its
    process() returns."""
    s = store(tmp_path, busy_timeout="0.1s")
    s.CHUNK_ROWS = 2
    m1 = parsed(make_message("1", "one", "body"))
    m2 = parsed(make_message("2", "two", "body"))
    blocker = connect(tmp_path / "db" / "mail.sqlite3")
    blocker.execute("BEGIN IMMEDIATE")
    try:
        s.process(m1)
        s.process(m2)  # the chunk is sent; the writer's failure is not known yet
        with pytest.raises(TemporaryFailure, match="locked"):
            s.flush()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert rows(tmp_path, "SELECT key FROM messages") == []
    s.flush()  # the failure was reported once; nothing is left to write
    s.process(m1)
    assert rows(tmp_path, "SELECT key FROM messages") == [(m1.key,)]
    s.close()


def test_prepared_rows_held_before_flush_are_bounded_by_max_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAX_HELD (8 MB, "bounds peak RSS") counts raw + text + html only: attachment
    text (up to extract.max_chars = 200 000 per attachment, any number of them) is held
    twice per message (the record JSON and attachment_text) and never counted, so up
    to MAX_ROWS = 512 such messages are kept in memory until flush()."""
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


def test_a_replaced_key_is_counted_once_in_the_held_octets(tmp_path: Path) -> None:
    """process() of a key already held replaces its rows: MAX_HELD counts the new
    rows only, not both versions."""
    s = store(tmp_path)
    first = parsed(make_message("1", "one", "body"))
    s.process(first)
    once = s._held
    assert once > 0
    for _ in range(3):
        s.process(parsed(make_message("1", "one", "body")))
    assert len(s._rows) == 1
    assert s._held == s._rows[first.key].octets
    assert s._held <= once + 100  # stored_at may differ by a few characters
    s.flush()
    s.close()
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(1,)]


def _contents(tmp_path: Path) -> list[list[tuple[object, ...]]]:
    """Every stored value but the write times and row ids (a spooled message is
    written in its process()): messages, raw bytes, attachments, tags and the keys
    the FTS index finds."""
    columns = ", ".join(
        "json_remove(record, '$.stored_at')" if c == "record" else c
        for c in sqlite_store._COLUMNS
        if c not in ("stored_at", "updated_at")
    )
    return [
        rows(tmp_path, f"SELECT {columns} FROM messages ORDER BY key"),
        rows(tmp_path, "SELECT key, raw FROM message_raw ORDER BY key"),
        rows(tmp_path, "SELECT * FROM attachments ORDER BY key, idx"),
        rows(tmp_path, "SELECT * FROM tags ORDER BY key, tag"),
        *(
            rows(
                tmp_path,
                "SELECT m.key FROM messages_fts JOIN messages m ON m.id = "
                "messages_fts.rowid WHERE messages_fts MATCH ? ORDER BY m.key",
                word,
            )
            for word in ("alice", "report", "first", "second", "pdf", "spooled")
        ),
    ]


def _mixed_group(tmp_path: Path) -> list[list[Message]]:
    """Two rounds of messages: tagged, with an attachment, spooled (raw written in
    pieces), and in round two the same keys again with other contents."""
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    rounds = []
    for n, word in ((1, "first"), (2, "second")):
        plain = parsed(make_message("a", f"plain {word}", f"{word} body"))
        plain.tags.add(f"t{n}")
        attached = parsed(
            make_message("b", f"with {word}", "see report", attachment=b"%PDF" * n)
        )
        big = make_message("c", f"spooled {word}", f"{word} spooled body")
        path = spool / f"c{n}.eml"
        path.write_bytes(big.raw)
        spooled = parsed(Message(ref=big.ref, spool_path=path))
        rounds.append([plain, attached, spooled] if n == 1 else [spooled, plain, attached])
    return rounds


def test_a_group_write_stores_what_writing_each_message_alone_stores(
    tmp_path: Path,
) -> None:
    """Issue 18: flush() writes a group with each statement once for all its
    messages; the database then holds what committing each message alone holds."""
    alone, grouped = tmp_path / "alone", tmp_path / "grouped"
    threaded = tmp_path / "threaded"
    rounds = _mixed_group(tmp_path)  # the same bytes (MIME boundaries) for all
    for path, options in (
        (alone, {"group_commit": False}),
        (grouped, {}),  # writer = "process"
        (threaded, {"writer": "thread"}),
    ):
        path.mkdir()
        s = store(path, **options)
        for messages in rounds:
            for m in messages:
                s.process(m)
            s.flush()
        s.close()
    assert _contents(grouped) == _contents(alone)
    assert _contents(threaded) == _contents(alone)
    assert [len(t) for t in _contents(grouped)[:4]] == [3, 3, 1, 1]


def test_a_group_write_costs_the_same_calls_for_any_number_of_messages(
    tmp_path: Path,
) -> None:
    """Issue 18: the calls into SQLite of one flush() do not grow with its messages
    (executemany per statement), where each message took seven of its own."""

    class Counting:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn, self.calls = conn, 0

        def execute(self, *args: object) -> object:
            self.calls += 1
            return self.conn.execute(*args)  # type: ignore[arg-type]

        def executemany(self, *args: object) -> object:
            self.calls += 1
            return self.conn.executemany(*args)  # type: ignore[arg-type]

        def __getattr__(self, name: str) -> object:
            return getattr(self.conn, name)

    s = store(tmp_path)
    assert s._conn is not None
    counting = Counting(s._conn)
    s._conn = counting  # type: ignore[assignment]
    calls = []
    for first, count in ((0, 2), (2, 40)):
        for i in range(first, first + count):
            s.process(parsed(make_message(str(i), f"m{i}", "body")))
        counting.calls = 0
        s.flush()
        calls.append(counting.calls)
    s._conn = counting.conn
    s.close()
    assert calls[0] == calls[1], calls
    assert rows(tmp_path, "SELECT count(*) FROM message_raw") == [(42,)]


def test_the_write_times_are_the_records_stored_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stored_at and updated_at are the stored_at of the record column (one clock
    read a message, issue 18), not a second reading that may fall in another second."""
    monkeypatch.setattr(sqlite_store, "_now", lambda: "1999-01-01T00:00:00+00:00")
    s = store(tmp_path)
    s.process(parsed(make_message("1", "one", "body")))
    s.close()
    [(stored_at, updated_at, record)] = rows(
        tmp_path, "SELECT stored_at, updated_at, record FROM messages"
    )
    assert stored_at == updated_at == json.loads(str(record))["stored_at"]
    assert stored_at != "1999-01-01T00:00:00+00:00"
