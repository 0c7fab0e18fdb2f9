"""store.mbox on the real file system: mboxrd round trip, once per key, locking."""

from __future__ import annotations

import mailbox
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mailpipe.plugins.store.mbox import (
    KEY_HEADER,
    MboxOptions,
    MboxStore,
    quote,
    read_entries,
    unquote,
)

from mailpipe import Message, ProcessorContext, TemporaryFailure

TRICKY = (
    b"Return-Path: <alice@example.com>\r\nFrom: Alice <alice@example.com>\r\n"
    b"Subject: quoting\r\n\r\nFrom the start\r\n>From once quoted\r\n"
    b">>From twice quoted\r\nnot From here\r\n\r\nFrom after a blank line"
)
PLAIN = b"From: Bob <bob@example.org>\r\nSubject: plain\r\n\r\nHello.\r\n"


def store(tmp_path: Path, *, dry_run: bool = False, **options: object) -> MboxStore:
    opts = MboxOptions.model_validate({"path": "mail/inbox.mbox", **options})
    return MboxStore(opts, ProcessorContext(base_dir=tmp_path, dry_run=dry_run))


def as_lf(raw: bytes) -> bytes:
    data = raw.replace(b"\r\n", b"\n")
    return data if data.endswith(b"\n") else data + b"\n"


def strip_ours(data: bytes) -> tuple[bytes, bytes]:
    """Split the stdlib's view of an entry into our two header lines and the rest."""
    key_line, octets_line, rest = data.split(b"\n", 2)
    assert key_line.startswith(KEY_HEADER)
    assert octets_line == b"X-Mailpipe-Octets: " + str(len(rest)).encode()
    return key_line[len(KEY_HEADER):], rest


def test_mboxrd_quoting_round_trips_through_the_stdlib_reader(tmp_path: Path) -> None:
    a = Message.from_bytes(TRICKY, mailbox="support", uid="1")
    b = Message.from_bytes(PLAIN, mailbox="support", uid="2")
    s = store(tmp_path)
    s.process(a)
    s.process(b)
    path = tmp_path / "mail" / "inbox.mbox"
    box = mailbox.mbox(path, create=False)
    try:
        assert len(box) == 2
        keys = list(box.iterkeys())
        got = [strip_ours(box.get_bytes(k)) for k in keys]
        assert box[keys[0]].get_from().startswith("alice@example.com ")
        assert box[keys[1]].get_from().startswith("bob@example.org ")
    finally:
        box.close()
    assert [(k.decode(), unquote(body)) for k, body in got] == [
        (a.key, as_lf(TRICKY)),
        (b.key, as_lf(PLAIN)),
    ]
    text = path.read_bytes()
    assert b"\n>From the start\n>>From once quoted\n>>>From twice quoted\n" in text
    assert b"\n>From after a blank line\n" in text
    assert list(read_entries(path)) == [(a.key, as_lf(TRICKY)), (b.key, as_lf(PLAIN))]


def test_quote_and_unquote_are_inverse() -> None:
    for raw in (TRICKY, PLAIN, b"From x", b">From"):
        assert unquote(quote(raw)) == as_lf(raw)


def test_rerun_appends_nothing_twice(tmp_path: Path) -> None:
    m = Message.from_bytes(TRICKY, mailbox="support", uid="1")
    store(tmp_path).process(m)
    path = tmp_path / "mail" / "inbox.mbox"
    size = path.stat().st_size
    s = store(tmp_path)  # a new process: scans the file
    s.process(m)
    s.process(m)
    assert path.stat().st_size == size
    assert [k for k, _ in read_entries(path)] == [m.key]


def test_entries_added_by_another_program_are_respected(tmp_path: Path) -> None:
    m1 = Message.from_bytes(TRICKY, mailbox="support", uid="1")
    m2 = Message.from_bytes(PLAIN, mailbox="support", uid="2")
    s = store(tmp_path)
    s.process(m1)
    path = tmp_path / "mail" / "inbox.mbox"
    box = mailbox.mbox(path)
    box.lock()
    box.add(b"From: Carol <c@example.net>\nSubject: by hand\n\nhi\n")
    box.flush()
    box.unlock()
    box.close()
    s.process(m1)  # rescans: still there
    s.process(m2)
    keys = [k for k, _ in read_entries(path)]
    assert keys == [m1.key, None, m2.key]
    assert len(mailbox.mbox(path)) == 3


def test_a_torn_append_is_cut_and_written_again(tmp_path: Path) -> None:
    m = Message.from_bytes(TRICKY, mailbox="support", uid="1")
    other = Message.from_bytes(PLAIN, mailbox="support", uid="2")
    s = store(tmp_path)
    s.process(other)
    path = tmp_path / "mail" / "inbox.mbox"
    whole = path.stat().st_size
    s.process(m)
    with path.open("r+b") as f:  # the crash hit in the middle of the second entry
        f.truncate(whole + 120)
    s2 = store(tmp_path)
    s2.process(m)
    assert list(read_entries(path)) == [(other.key, as_lf(PLAIN)), (m.key, as_lf(TRICKY))]


def test_a_torn_entry_of_another_message_is_kept_and_skipped(tmp_path: Path) -> None:
    m = Message.from_bytes(TRICKY, mailbox="support", uid="1")
    other = Message.from_bytes(PLAIN, mailbox="support", uid="2")
    store(tmp_path).process(other)
    path = tmp_path / "mail" / "inbox.mbox"
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 5)
    s = store(tmp_path)
    s.process(m)
    s.process(other)  # torn, so not stored: written again, complete
    entries = list(read_entries(path))
    assert [k for k, _ in entries] == [other.key, m.key, other.key]
    assert entries[1:] == [(m.key, as_lf(TRICKY)), (other.key, as_lf(PLAIN))]
    assert len(mailbox.mbox(path)) == 3


def test_a_held_dotlock_is_waited_for_then_a_temporary_failure(tmp_path: Path) -> None:
    s = store(tmp_path, lock_timeout="0.2s")
    lock = tmp_path / "mail" / "inbox.mbox.lock"
    lock.parent.mkdir()
    lock.write_bytes(b"")
    with pytest.raises(TemporaryFailure, match="held"):
        s.process(Message.from_bytes(PLAIN, uid="1"))
    old = time.time() - 3600
    os.utime(lock, (old, old))  # its owner died long ago
    s.process(Message.from_bytes(PLAIN, uid="1"))
    assert not lock.exists()
    assert len(list(read_entries(tmp_path / "mail" / "inbox.mbox"))) == 1


def test_a_dotlock_left_by_a_killed_worker_is_removed_at_once(tmp_path: Path) -> None:
    """A worker SIGKILLed while appending leaves <path>.lock behind; the next writer
    (holding the fcntl lock, so no live mailpipe writer is inside) sees that the pid
    in it is gone and takes over at once instead of waiting ``stale_dotlock``."""
    s = store(tmp_path, lock_timeout="0.2s")
    lock = tmp_path / "mail" / "inbox.mbox.lock"
    lock.parent.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists
    lock.write_text(f"{dead.pid}\n{socket.gethostname()}\n")
    s.process(Message.from_bytes(PLAIN, uid="1"))
    assert not lock.exists()
    lock.write_text(f"{os.getpid()}\n{socket.gethostname()}\n")  # alive: waited for
    with pytest.raises(TemporaryFailure, match="held"):
        s.process(Message.from_bytes(PLAIN, uid="2"))
    lock.write_text(f"{dead.pid}\nanother-host\n")  # not ours to judge
    with pytest.raises(TemporaryFailure, match="held"):
        s.process(Message.from_bytes(PLAIN, uid="2"))
    assert len(list(read_entries(tmp_path / "mail" / "inbox.mbox"))) == 1


def test_an_fcntl_lock_held_by_another_process_is_a_temporary_failure(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mail" / "inbox.mbox"
    path.parent.mkdir()
    path.write_bytes(b"")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys; f = open(sys.argv[1], 'r+b'); "
         "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(TemporaryFailure, match="locked"):
            store(tmp_path, lock_timeout="0.2s").process(Message.from_bytes(PLAIN, uid="1"))
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        holder.stdout.close()  # type: ignore[union-attr]
    store(tmp_path).process(Message.from_bytes(PLAIN, uid="1"))
    assert len(list(read_entries(path))) == 1


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    store(tmp_path, dry_run=True).process(Message.from_bytes(PLAIN, uid="1"))
    assert not (tmp_path / "mail").exists()
