"""store.sqlite's FTS5 index from version 5: the store indexes the rows it inserts in
their own transaction (issue 18); the index and the rows never part, not even when the
process is killed in the middle of a write."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mailpipe.plugins.parse import parse_into
from mailpipe.plugins.store.sqlite import (
    SqliteOptions,
    SqliteStore,
    connect,
    migrate,
    schema_version,
    search,
)

from mailpipe import Message, ProcessorContext


def _message(uid: str, subject: str, body: str) -> Message:
    raw = (f"From: Alice <alice@example.com>\r\nSubject: {subject}\r\n"
           f"Message-ID: <{uid}@example.com>\r\n\r\n{body}\r\n").encode()
    message = Message.from_bytes(raw, mailbox="box", uid=uid)
    parse_into(message)
    return message


def _store(path: Path) -> SqliteStore:
    store = SqliteStore(
        SqliteOptions.model_validate({"path": str(path)}),
        ProcessorContext(base_dir=path.parent),
    )
    store.open()
    return store


def _indexed(conn: sqlite3.Connection) -> tuple[list[int], list[int]]:
    """(ids of the messages rows, rowids the index holds a document for)."""
    rows = [r[0] for r in conn.execute("SELECT id FROM messages ORDER BY id")]
    docs = [r[0] for r in conn.execute("SELECT id FROM messages_fts_docsize ORDER BY id")]
    return rows, docs


def _segments(conn: sqlite3.Connection) -> int:
    # FTS5 %_data rowids of leaf pages carry the segment id above bit 37.
    (count,) = conn.execute(
        "SELECT count(DISTINCT id >> 37) FROM messages_fts_data WHERE id >> 37 > 0"
    ).fetchone()
    return int(count)


def test_migration_5_keeps_the_index_and_the_store_indexes_what_it_inserts(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mail.sqlite3"
    conn = connect(path)
    assert migrate(conn, target=4) == 4
    conn.close()
    old = _store(path)  # version 5 code on a version 4 file: migrates on open
    old.close()
    conn = connect(path)
    assert schema_version(conn) == 5
    triggers = {r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    assert triggers == {"messages_fts_ai", "messages_fts_ad", "messages_fts_au"}
    assert conn.execute("SELECT active FROM store_writing").fetchall() == [(0,)]
    conn.close()

    s = _store(path)
    first = _message("1", "walrus report", "the tusks are long")
    s.process(first)
    s.process(_message("2", "penguin news", "colder than usual"))
    s.flush()
    s.process(_message("1", "walrus update", "shorter tusks now"))  # replaced in place
    s.process(_message("3", "seal memo", "walrus sighted"))
    s.close()

    conn = connect(path)
    assert search(conn, "penguin") == [_message("2", "", "").key]
    assert search(conn, "long") == []  # the replaced row's old words are gone
    assert sorted(search(conn, "walrus")) == sorted(
        [first.key, _message("3", "", "").key]
    )
    assert search(conn, "shorter") == [first.key]
    rows, docs = _indexed(conn)
    assert rows == docs == [1, 2, 3]
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    conn.execute("DELETE FROM messages WHERE id = 2")  # the delete trigger still works
    assert search(conn, "penguin") == []
    assert _indexed(conn) == ([1, 3], [1, 3])
    conn.close()


def test_a_group_is_indexed_as_one_segment(tmp_path: Path) -> None:
    """Issue 18: the insert trigger ran inside each UPSERT, and FTS5 writes its
    pending terms as a new segment at every statement's savepoint: one segment per
    message, about half of the store's CPU. The store now indexes a group's rows in
    one statement: one segment per write."""
    path = tmp_path / "mail.sqlite3"
    s = _store(path)
    assert s._conn is not None
    # No merging, so that the segments written can be counted (up to 15 per level).
    s._conn.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('automerge', 0)")
    for i in range(10):
        s.process(_message(str(i), f"subject {i}", f"body {i}"))
    s.flush()
    s.close()
    conn = connect(path)
    assert _segments(conn) == 1
    assert len(search(conn, "body")) == 10
    conn.close()


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mailpipe.logs import configure
    configure("json", "warning")
    sys.path.insert(0, sys.argv[2])
    from test_store_sqlite_index import _message, _store

    path, start = Path(sys.argv[1]), int(sys.argv[3])
    s = _store(path)
    n = start
    while True:
        for _ in range(20):
            s.process(_message(str(n), f"subject {n}", f"body {n} word{n % 7}"))
            n += 1
        s.process(_message(str(n - 25), "again", f"replaced {n}"))  # an update
        s.flush()
        print(n, flush=True)
    """
)


def test_a_kill_never_parts_rows_from_their_index_entries(tmp_path: Path) -> None:
    """kill -9 at random instants while groups are written (inserts and an update
    each): after every kill the rows and the index's documents are the same ids, the
    index passes FTS5's integrity check, and every message flushed is searchable."""
    path = tmp_path / "mail.sqlite3"
    rng = random.Random(93)
    start = 0
    here = str(Path(__file__).parent)
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), here, str(start)],
            stdout=subprocess.PIPE, text=True,
        )
        assert child.stdout is not None
        flushed = [int(child.stdout.readline()) for _ in range(rng.randint(1, 3))]
        time.sleep(rng.random() * 0.05)  # somewhere inside the next group's write
        child.send_signal(signal.SIGKILL)
        child.wait()
        conn = connect(path)
        rows, docs = _indexed(conn)
        assert rows == docs
        conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
        last = flushed[-1] - 1  # the last message of the last group flushed
        assert len(search(conn, f"body AND {last}")) == 1
        (start,) = conn.execute("SELECT count(*) FROM messages").fetchone()
        start += 100  # new keys for the next child
        conn.close()


def _insert_as_other_writer(path: Path, message: Message, *, row_id: int | None = None) -> None:
    """Insert ``message``'s row as a writer that does not index it: a version-4
    mailpipe that opened the file before a version-5 one migrated it (its UPSERT then
    fires no insert trigger, the trigger is gone), or a user's own INSERT."""
    from mailpipe.plugins.store.sqlite import _UPSERT

    from mailpipe.document import message_document

    prepared = _store(path)._prepare(message_document(message), None)
    conn = connect(path)
    conn.execute(_UPSERT, prepared.message)
    if row_id is not None:
        conn.execute("UPDATE messages SET id = ? WHERE key = ?", (row_id, message.key))
    conn.close()


def test_redelivering_a_row_another_writer_inserted_does_not_corrupt(
    tmp_path: Path,
) -> None:
    """A contentless FTS5 table forgets a row by being told its old values: the
    update trigger's 'delete' of a row that was never indexed fails with "database
    disk image is malformed" (SQLITE_CORRUPT, a TemporaryFailure): the key could never
    be stored again, and its group failed with it. The store indexes such a row
    before replacing it."""
    path = tmp_path / "mail.sqlite3"
    _store(path).close()  # version 5
    _insert_as_other_writer(path, _message("1", "walrus report", "the tusks are long"))
    s = _store(path)
    s.process(_message("2", "penguin news", "colder than usual"))
    s.process(_message("1", "walrus update", "shorter tusks now"))  # re-delivered
    s.flush()
    s.close()
    conn = connect(path)
    rows, docs = _indexed(conn)
    assert rows == docs
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    assert search(conn, "shorter") == [_message("1", "", "").key]
    assert search(conn, "long") == []
    conn.close()


def test_rows_another_writer_inserted_are_indexed_by_the_next_write(
    tmp_path: Path,
) -> None:
    """During an upgrade a version-4 process still writing to the file after the
    migration to version 5 inserts rows that no trigger indexes: the next write of
    the store indexes them (the rows above the largest indexed id)."""
    path = tmp_path / "mail.sqlite3"
    _store(path).close()
    _insert_as_other_writer(path, _message("1", "walrus report", "the tusks are long"))
    s = _store(path)
    s.process(_message("2", "penguin news", "colder than usual"))
    s.close()
    conn = connect(path)
    assert _indexed(conn) == ([1, 2], [1, 2])
    assert search(conn, "walrus") == [_message("1", "", "").key]
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    conn.close()


def test_a_row_whose_id_is_not_above_the_largest_is_indexed(tmp_path: Path) -> None:
    """With a row at the largest rowid (2**63 - 1) SQLite picks a random unused
    rowid for the next row: not above the largest id before the write."""
    path = tmp_path / "mail.sqlite3"
    s = _store(path)
    s.process(_message("1", "walrus report", "the tusks are long"))
    s.flush()
    assert s._conn is not None
    s._conn.execute("UPDATE messages SET id = 9223372036854775807 WHERE id = 1")
    s.process(_message("2", "penguin news", "colder than usual"))
    s.process(_message("3", "seal memo", "colder still"))
    s.close()
    conn = connect(path)
    rows, docs = _indexed(conn)
    assert rows == docs and len(rows) == 3
    assert len(search(conn, "colder")) == 2
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    conn.close()


def test_another_writers_insert_is_indexed_by_the_trigger_and_can_be_deleted(
    tmp_path: Path,
) -> None:
    """Review of issue 18's schema 5: with the insert trigger dropped, a row another
    writer inserted (a version-4 mailpipe still running, a user's INSERT) had no index
    document until the store wrote its key again, and deleting it failed with
    "database disk image is malformed". The trigger now stays for every writer but
    the store's own write (``store_writing``), so such a row is indexed at once."""
    path = tmp_path / "mail.sqlite3"
    s = _store(path)
    s.process(_message("1", "walrus report", "the tusks are long"))
    s.flush()
    s.close()
    other = _message("o", "otter digest", "river news")
    low = _message("l", "heron note", "marsh")
    _insert_as_other_writer(path, other)
    _insert_as_other_writer(path, low, row_id=-5)  # below the largest indexed id
    conn = connect(path)
    assert search(conn, "otter") == [other.key]
    assert search(conn, "heron") == [low.key]
    rows, docs = _indexed(conn)
    assert rows == docs == [-5, 1, 2]
    conn.execute("DELETE FROM messages WHERE key IN (?, ?)", (other.key, low.key))
    conn.commit()
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    assert search(conn, "otter") == [] and search(conn, "heron") == []
    assert conn.execute("SELECT active FROM store_writing").fetchall() == [(0,)]
    conn.close()


def test_a_failed_store_write_leaves_the_trigger_on(tmp_path: Path) -> None:
    """The flag that turns the insert trigger off is set inside the store's write
    transaction; a write that fails rolls it back with its rows."""
    path = tmp_path / "mail.sqlite3"
    s = _store(path)
    assert s._conn is not None
    s._conn.execute(
        "CREATE TRIGGER refuse AFTER INSERT ON tags BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    msg = _message("1", "walrus report", "the tusks are long")
    msg.tags.add("x")
    s.process(msg)
    try:
        s.flush()
    except Exception:
        pass
    else:
        raise AssertionError("the group write should have failed")
    s.close()
    conn = connect(path)
    assert conn.execute("SELECT active FROM store_writing").fetchall() == [(0,)]
    assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    conn.close()
