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
    assert triggers == {"messages_fts_ad", "messages_fts_au"}
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
