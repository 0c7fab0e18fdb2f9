"""store.sqlite's ``process_nowait``: staging a message's rows in the held group is done
on the event loop (issue 18); every call that would write to the database, or wait for
the store's lock, returns ``LATER`` with the store's state unchanged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.store.sqlite import SqliteOptions, SqliteStore, connect

from mailpipe import LATER, Message, ProcessorContext, TemporaryFailure
from tests.plugins.test_store_sqlite import (
    _contents,
    _mixed_group,
    make_message,
    parsed,
    rows,
    store,
)

pytestmark = pytest.mark.timeout(120)


def state(s: SqliteStore) -> tuple[Any, ...]:
    """What process() would change: the held rows, their octets, the keys to write
    alone, a pending failure."""
    return dict(s._rows), s._held, set(s._inline), s._failure


def unchanged_later(s: SqliteStore, m: Message) -> None:
    before = state(s)
    assert s.process_nowait(m) is LATER
    assert state(s) == before


def test_nowait_stores_what_process_stores(tmp_path: Path) -> None:
    """The same rounds (a tagged message, an attachment, a spooled one; the same keys
    again with other contents) through process() alone, and through process_nowait()
    first as the chain calls it: the same database."""
    by_thread, on_loop = tmp_path / "process", tmp_path / "nowait"
    rounds = _mixed_group(tmp_path)
    staged = 0
    for path, nowait in ((by_thread, False), (on_loop, True)):
        path.mkdir()
        s = store(path)
        for messages in rounds:
            for m in messages:
                if not nowait or s.process_nowait(m) is LATER:
                    s.process(m)
                else:
                    staged += 1
            s.flush()
        s.close()
    assert _contents(on_loop) == _contents(by_thread)
    assert staged == 4  # all but the spooled message of each round


def test_nowait_holds_rows_until_flush_as_process_does(tmp_path: Path) -> None:
    s = store(tmp_path)
    m = parsed(make_message("1", "one", "body"))
    assert s.process_nowait(m) is None
    assert list(s._rows) == [m.key] and s._held == s._rows[m.key].octets
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]  # not durable yet
    again = parsed(make_message("1", "one again", "other body"))
    assert s.process_nowait(again) is None  # the key's rows replaced, counted once
    assert list(s._rows) == [m.key] and s._held == s._rows[m.key].octets
    s.flush()
    assert rows(tmp_path, "SELECT subject FROM messages") == [("one again",)]
    s.close()


def test_a_dry_run_is_left_to_process(tmp_path: Path) -> None:
    opts = SqliteOptions.model_validate({"path": "mail.sqlite3"})
    s = SqliteStore(opts, ProcessorContext(base_dir=tmp_path, dry_run=True))
    unchanged_later(s, parsed(make_message("1", "one", "body")))
    assert not (tmp_path / "mail.sqlite3").exists()


def test_without_group_commit_every_message_is_written_by_process(
    tmp_path: Path,
) -> None:
    s = store(tmp_path, group_commit=False)
    unchanged_later(s, parsed(make_message("1", "one", "body")))
    s.close()


def test_a_spooled_or_large_message_is_left_to_process(tmp_path: Path) -> None:
    s = store(tmp_path)
    m = make_message("1", "spooled", "body")
    path = tmp_path / "m.eml"
    path.write_bytes(m.raw)
    unchanged_later(s, parsed(Message(ref=m.ref, spool_path=path)))
    big = parsed(make_message("2", "big", "x" * s.NOWAIT_OCTETS))
    unchanged_later(s, big)
    s.close()


def test_a_key_whose_group_write_failed_is_written_alone_by_process(
    tmp_path: Path,
) -> None:
    s = store(tmp_path)
    m = parsed(make_message("1", "one", "body"))
    s._inline.add(m.key)
    unchanged_later(s, m)
    s.close()


def test_the_store_lock_is_never_waited_for_on_the_loop(tmp_path: Path) -> None:
    """A flush(), close() or abandoned process() holding the lock: LATER at once."""
    s = store(tmp_path)
    m = parsed(make_message("1", "one", "body"))
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with s._lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(30)
        unchanged_later(s, m)
    finally:
        release.set()
        t.join(30)
    assert s.process_nowait(m) is None
    s.close()


@pytest.mark.parametrize(
    ("writer", "bound"),
    [
        ("thread", "MAX_ROWS"),
        ("thread", "MAX_HELD"),
        ("process", "CHUNK_ROWS"),
        ("process", "CHUNK_OCTETS"),
    ],
)
def test_a_message_that_fills_the_group_is_written_by_process(
    tmp_path: Path, writer: str, bound: str
) -> None:
    """The message that makes the group reach MAX_ROWS or MAX_HELD (writer = "thread")
    or a chunk's CHUNK_ROWS or CHUNK_OCTETS (writer = "process") makes process() write
    the group or send the chunk: LATER, nothing staged; process() then writes it
    (the writer process: committed by the next flush() at the latest)."""
    s = store(tmp_path, writer=writer)
    first = parsed(make_message("1", "one", "body"))
    assert s.process_nowait(first) is None
    second = parsed(make_message("2", "two", "body"))
    if bound.endswith("ROWS"):
        setattr(s, bound, 2)
    else:
        setattr(s, bound, s._held + 1)  # (what is held now: below it)
    unchanged_later(s, second)
    s.process(second)  # the early write (or the chunk sent)
    assert s._rows == {}
    if writer == "process":
        assert list(s._sent.values()) == [[first.key, second.key]]
        s.flush()
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(2,)]
    s.close()


def test_the_same_key_again_below_the_bound_is_staged(tmp_path: Path) -> None:
    """A key already held replaces its rows: the group does not grow."""
    s = store(tmp_path)
    first = parsed(make_message("1", "one", "body"))
    assert s.process_nowait(first) is None
    s.MAX_ROWS = 2
    assert s.process_nowait(parsed(make_message("1", "one", "new body"))) is None
    assert len(s._rows) == 1
    s.close()


def test_a_message_the_checks_refuse_fails_as_in_process(tmp_path: Path) -> None:
    """A tag that SQLite cannot encode (a lone surrogate): the same error as process(),
    nothing staged."""
    s = store(tmp_path)
    m = parsed(make_message("1", "one", "body"))
    m.tags.add("bad\udcff")
    before = state(s)
    with pytest.raises(UnicodeEncodeError):
        s.process(m)
    assert state(s) == before
    with pytest.raises(UnicodeEncodeError):
        s.process_nowait(m)
    assert state(s) == before
    s.close()


def test_a_pending_early_write_failure_still_fails_the_next_flush(
    tmp_path: Path,
) -> None:
    """MP-04: a group write that process() started and that failed is raised by the
    next flush(); a message staged on the loop in between does not hide it."""
    s = store(tmp_path, busy_timeout="0.1s", writer="thread")
    s.MAX_ROWS = 2
    s.process(parsed(make_message("1", "one", "body")))
    with another_writer(tmp_path), pytest.raises(TemporaryFailure):
        s.process(parsed(make_message("2", "two", "body")))  # early write fails
    assert s.process_nowait(parsed(make_message("3", "three", "body"))) is None
    with pytest.raises(TemporaryFailure, match="not stored"):
        s.flush()
    s.close()


@contextmanager
def another_writer(tmp_path: Path) -> Iterator[None]:
    """Another connection holds the database's write lock meanwhile."""
    conn = connect(tmp_path / "db" / "mail.sqlite3")
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.close()  # (rolls the empty transaction back)


# Review r-e2e (S-12: a hostile server cannot exhaust the event loop's time).


def _calls(fn: Any, *args: Any) -> tuple[Any, int]:
    """``fn(*args)`` and the number of Python and C function calls it made."""
    import sys

    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        result = fn(*args)
    finally:
        sys.setprofile(None)
    return result, count


def test_an_unparsed_message_is_left_to_the_thread(tmp_path: Path) -> None:
    """Without a record (no ``parse`` step before the store) the message's document
    comes from the stdlib's email parser (``minimal_record``), whose cost a hostile
    server chooses: 8 KiB of ``To: a,a,a,…`` takes ~0.2 s of CPU. That is never done
    on the event loop, where the processing_budget cannot abandon it (counted in
    function calls, not time)."""
    s = store(tmp_path)
    hostile = make_message("1", "hostile", "body")
    hostile.data = b"To: " + b"a," * 3900 + b"\r\n\r\nbody\r\n"
    assert hostile.record is None and len(hostile.data) <= s.NOWAIT_OCTETS
    before = state(s)
    result, calls = _calls(s.process_nowait, hostile)
    assert calls < 20_000  # (h-e2e: ~1.5 million calls, ~0.2 s, on the loop)
    assert result is LATER and state(s) == before
    s.process(hostile)  # the step's thread stores it as before
    s.flush()
    assert rows(tmp_path, "SELECT parsed FROM messages") == [(0,)]
    s.close()


def test_a_parsed_message_of_many_addresses_is_left_to_the_thread(
    tmp_path: Path,
) -> None:
    """8 KiB of ``To: a,a,…`` parsed (on the step's thread: too large for parse on
    the loop) is a record of ~3900 addresses, each turned into JSON and the FTS
    address text when staged: ~4 ms on the loop, ten times the bound's estimate.
    Past NOWAIT_ADDRESSES the store leaves it to its thread (counted in calls)."""
    s = store(tmp_path)
    small, _ = _calls(s.process_nowait, parsed(make_message("0", "small", "body")))
    assert small is None
    _, per_message = _calls(s.process_nowait, parsed(make_message("9", "small", "b")))
    m = make_message("1", "many", "body")
    m.data = b"To: " + b"a," * 3900 + b"\r\n\r\nbody\r\n"
    m = parsed(m)
    assert len(m.data) <= s.NOWAIT_OCTETS and len(m.record.to) > 1000
    before = state(s)
    result, calls = _calls(s.process_nowait, m)
    assert calls < 10 * per_message  # (h-e2e: ~45 times a small message's)
    assert result is LATER and state(s) == before
    s.close()
