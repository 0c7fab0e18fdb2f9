"""store.sqlite's writer process (issue 18): programs committed in order, each whole or
not at all; failures rebuilt and classified as in-process; the child's death fails what
it had not answered; the parent's death ends the child; the memory bound; no child for a
run that writes nothing."""

from __future__ import annotations

import ast
import io
import os
import resource
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.store import _sqlite_writes
from mailpipe.plugins.store._sqlite_schema import classify
from mailpipe.plugins.store._sqlite_writer import WriterProcess, rebuild
from mailpipe.plugins.store._sqlite_writes import (
    describe,
    frame,
    open_connection,
    serve,
    write_frame,
)

from mailpipe import Message, PermanentFailure, TemporaryFailure
from tests.plugins.test_store_sqlite import make_message, parsed, rows, store

pytestmark = pytest.mark.timeout(120)

INSERT = "INSERT INTO t (k, v) VALUES (?, ?)"


def database(tmp_path: Path) -> Path:
    path = tmp_path / "w.sqlite3"
    conn = open_connection(path)
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
    conn.close()
    return path


def table(path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT k, v FROM t ORDER BY k").fetchall()
    finally:
        conn.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # (a zombie of ours counts as gone)
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_programs_are_committed_in_order_and_a_failed_one_stores_nothing(
    tmp_path: Path,
) -> None:
    path = database(tmp_path)
    w = WriterProcess(str(path), 5.0, max_pending=1 << 20)
    first = w.submit([("executemany", INSERT, [("a", "1"), ("b", "1")])], 10)
    # the second fails at its second row (NOT NULL): its first row is not stored
    bad = w.submit([("execute", INSERT, ("c", "2")), ("execute", INSERT, ("d", None))], 10)
    third = w.submit([("execute", "UPDATE t SET v = '3' WHERE k = 'a'", ())], 10)
    assert w.wait(first) is None
    error = w.wait(bad)
    assert isinstance(error, sqlite3.IntegrityError)
    assert error.sqlite_errorname == "SQLITE_CONSTRAINT_NOTNULL"
    assert isinstance(classify(error, "x"), PermanentFailure)
    assert w.wait_all() == {third: None}
    assert table(path) == [("a", "3"), ("b", "1")]
    pid = w.pid
    assert pid is not None and alive(pid)
    assert w.close() == {}
    assert not alive(pid)


def test_a_busy_database_is_rebuilt_as_a_temporary_failure(tmp_path: Path) -> None:
    path = database(tmp_path)
    blocker = open_connection(path)
    blocker.execute("BEGIN IMMEDIATE")
    w = WriterProcess(str(path), 0.1, max_pending=1 << 20)
    try:
        error = w.wait(w.submit([("execute", INSERT, ("a", "1"))], 1))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert isinstance(error, sqlite3.OperationalError)
    assert isinstance(classify(error, "x"), TemporaryFailure)
    assert w.wait(w.submit([("execute", INSERT, ("a", "1"))], 1)) is None
    w.close()
    assert table(path) == [("a", "1")]


def test_rebuild_keeps_sqlite_classes_and_names_anything_else() -> None:
    exc = sqlite3.OperationalError("disk I/O error")
    exc.sqlite_errorname = "SQLITE_IOERR"
    exc.sqlite_errorcode = 10
    again = rebuild(describe(exc))
    assert type(again) is sqlite3.OperationalError and str(again) == "disk I/O error"
    assert (again.sqlite_errorname, again.sqlite_errorcode) == ("SQLITE_IOERR", 10)
    other = rebuild(describe(FileNotFoundError(2, "No such file")))
    assert isinstance(other, TemporaryFailure) and "FileNotFoundError" in str(other)
    # a class of that name outside sqlite3 is not taken for sqlite3's
    assert isinstance(rebuild(("x", "Error", "e", None, None)), TemporaryFailure)


def test_a_killed_writer_fails_what_it_had_not_answered_and_is_started_again(
    tmp_path: Path,
) -> None:
    path = database(tmp_path)
    blocker = open_connection(path)
    blocker.execute("BEGIN IMMEDIATE")  # the child waits on its first program
    w = WriterProcess(str(path), 30.0, max_pending=1 << 20)
    try:
        seqs = [w.submit([("execute", INSERT, (k, "1"))], 1) for k in "ab"]
        pid = w.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        outcomes = w.wait_all()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert sorted(outcomes) == seqs
    assert all(isinstance(e, TemporaryFailure) for e in outcomes.values())
    assert "ended" in str(outcomes[seqs[0]])
    assert w.wait(w.submit([("execute", INSERT, ("c", "1"))], 1)) is None
    assert w.pid not in (None, pid)
    w.close()
    assert table(path) == [("c", "1")]


def test_the_writer_ignores_sigint_and_sigterm_the_parent_decides(tmp_path: Path) -> None:
    """Ctrl-C and a service manager's SIGTERM reach the whole process group; the
    parent's graceful stop still flushes through the writer."""
    path = database(tmp_path)
    w = WriterProcess(str(path), 5.0, max_pending=1 << 20)
    assert w.wait(w.submit([("execute", INSERT, ("a", "1"))], 1)) is None
    pid = w.pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    assert w.wait(w.submit([("execute", INSERT, ("b", "1"))], 1)) is None
    assert w.pid == pid
    w.close()
    assert table(path) == [("a", "1"), ("b", "1")]


def test_submit_waits_for_answers_while_too_many_octets_are_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the memory bound reads the first answer here (the look for answers
    already there is turned off): without it the second submit would not wait and
    both would be pending."""
    path = database(tmp_path)
    w = WriterProcess(str(path), 5.0, max_pending=100)
    monkeypatch.setattr(w, "_drain", lambda: None)
    first = w.submit([("execute", INSERT, ("a", "1"))], 80)
    assert w._pending == {first: 80}
    second = w.submit([("execute", INSERT, ("b", "1"))], 20)  # 100: fits
    assert w._pending == {first: 80, second: 20}
    third = w.submit([("execute", INSERT, ("c", "1"))], 80)  # 180 > 100: waits
    assert w._pending == {second: 20, third: 80}  # (until it fits: 100)
    assert w._outcomes == {first: None}
    w.close()


def test_a_request_cut_short_is_never_run(tmp_path: Path) -> None:
    """The parent died while sending: the child runs every request it read in full,
    answers it, and stops at the cut one."""
    path = database(tmp_path)
    stream = io.BytesIO()
    write_frame(stream, (1, [("execute", INSERT, ("a", "1"))]))
    header, data = frame((2, [("execute", INSERT, ("b", "1"))]))
    stream.write(header + data[: len(data) // 2])
    stream.seek(0)
    out = io.BytesIO()
    serve(str(path), 5.0, stream, out)
    assert table(path) == [("a", "1")]
    out.seek(0)
    assert _sqlite_writes.read_frame(out) == (1, None)
    assert _sqlite_writes.read_frame(out) is None


def test_an_answer_to_a_parent_gone_ends_the_loop_quietly(tmp_path: Path) -> None:
    """The parent died while the child wrote its answer: the committed program stays
    committed, the loop returns (no traceback on the shared stderr)."""
    path = database(tmp_path)
    stream = io.BytesIO()
    for k in "ab":
        write_frame(stream, (1, [("execute", INSERT, (k, "1"))]))
    stream.seek(0)

    class Gone(io.BytesIO):
        def write(self, data: Any) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    serve(str(path), 5.0, stream, Gone())
    assert table(path) == [("a", "1")]


def test_the_writer_process_whose_parent_is_gone_exits_quietly(tmp_path: Path) -> None:
    """The real child (``python -I -S``, a buffered stdout): an answer that finds the
    answers' pipe closed ends it with status 0 and nothing on the shared stderr (the
    unflushed answer must not fail again at the interpreter's exit: status 120)."""
    path = database(tmp_path)
    r, w = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-I", "-S", _sqlite_writes.__file__, str(path), "5.0"],
        stdin=subprocess.PIPE, stdout=w, stderr=subprocess.PIPE,
    )
    os.close(w)
    os.close(r)  # the parent's end of the answers is gone
    _, err = child.communicate(
        b"".join(
            part
            for k in "ab"
            for part in frame((1, [("execute", INSERT, (k, "1"))]))
        ),
        timeout=60,
    )
    assert (child.returncode, err) == (0, b"")
    assert table(path) == [("a", "1")]


def test_the_writer_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    path = database(tmp_path)
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from mailpipe.plugins.store._sqlite_writer import WriterProcess
            w = WriterProcess({str(path)!r}, 5.0, max_pending=1 << 20)
            w.wait(w.submit([("execute", "INSERT INTO t VALUES ('a', '1')", ())], 1))
            print(w.pid, flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        exited = os.pidfd_open(child)  # (not our child: no waitpid)
        try:
            parent.kill()
            parent.wait()
            # Readable once the writer has exited; a writer that outlives its parent
            # fails the test at its timeout (no wall-clock threshold here).
            select.select([exited], [], [])
        finally:
            os.close(exited)
        assert not alive(child), "the writer outlived its parent"
    finally:
        parent.kill()
        parent.wait()
    assert table(path) == [("a", "1")]


def test_the_writer_module_imports_the_standard_library_only() -> None:
    """It runs as ``python -I -S`` (no site-packages, no mailpipe): a third-party or
    mailpipe import would fail there, and would cost start-up if it did not."""
    source = Path(_sqlite_writes.__file__).read_text()
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import"
            assert node.module is not None
            names.add(node.module.split(".")[0])
    assert names <= sys.stdlib_module_names | {"__future__"}, names


def test_a_store_that_writes_nothing_starts_no_writer(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.flush()
    s.close()
    assert s._writer is None


def test_close_commits_what_is_held_and_ends_the_writer(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.process(parsed(make_message("1", "one", "body")))
    s.flush()
    writer = s._writer
    assert writer is not None and writer.pid is not None
    pid = writer.pid
    s.process(parsed(make_message("2", "two", "body")))
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(1,)]  # still held
    s.close()
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(2,)]
    assert s._writer is None and not alive(pid)


def test_a_writer_that_cannot_be_started_again_leaves_nothing_to_wait_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child dies while submit() waits for room (the memory bound) and a new one
    cannot be started (no process, no file descriptor left): that submit raises, and
    the program it did not send is not left pending: wait_all() answers (it would
    wait for ever for an answer no child will give) and the next submit works."""
    path = database(tmp_path)
    blocker = open_connection(path)
    blocker.execute("BEGIN IMMEDIATE")  # the child waits on its first program
    w = WriterProcess(str(path), 30.0, max_pending=100)
    try:
        first = w.submit([("execute", INSERT, ("a", "1"))], 80)
        pid = w.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

        def no_process(self: WriterProcess) -> None:
            raise OSError(24, "Too many open files")

        with monkeypatch.context() as m:
            m.setattr(WriterProcess, "_start", no_process)
            with pytest.raises(OSError):
                w.submit([("execute", INSERT, ("b", "1"))], 80)  # 160 > 100: waits
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    outcomes = w.wait_all()
    assert list(outcomes) == [first] and isinstance(outcomes[first], TemporaryFailure)
    assert w.wait(w.submit([("execute", INSERT, ("c", "1"))], 1)) is None
    assert w.wait_all() == {}
    w.close()
    assert table(path) == [("c", "1")]



def test_a_writer_that_died_while_idle_is_started_again_for_the_next_program(
    tmp_path: Path,
) -> None:
    """The contract: the next submit after the child's death starts a new child. A
    child that died with nothing pending (killed, out of memory) must not take the
    next program with it: it is run by a new child, not failed."""
    path = database(tmp_path)
    w = WriterProcess(str(path), 5.0, max_pending=1 << 20)
    assert w.wait(w.submit([("execute", INSERT, ("a", "1"))], 1)) is None
    proc = w._proc
    assert proc is not None
    proc.kill()
    proc.wait()  # dead (and reaped) before the next submit
    assert w.wait(w.submit([("execute", INSERT, ("b", "1"))], 1)) is None
    assert w.pid not in (None, proc.pid)
    w.close()
    assert table(path) == [("a", "1"), ("b", "1")]


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_message_written_alone_that_sqlite_refuses_fails_as_with_the_thread(
    tmp_path: Path, writer: str
) -> None:
    """A spooled message (written alone, in process()) with a tag SQLite cannot
    encode (a lone surrogate): the same error with either writer, the message's own
    (UnicodeEncodeError), not a TemporaryFailure that has it retried as if the
    environment had failed; nothing stored."""
    s = store(tmp_path, writer=writer)
    big = make_message("1", "one", "body")
    spooled_at = tmp_path / "1.eml"
    spooled_at.write_bytes(big.raw)
    m = parsed(Message(ref=big.ref, spool_path=spooled_at))
    m.tags.add("bad\udcff")
    with pytest.raises(UnicodeEncodeError):
        s.process(m)
    s.close()
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]


def test_the_writer_works_with_its_pipes_past_fd_setsize(tmp_path: Path) -> None:
    """A busy service holds many descriptors (sockets of many mailboxes, a group's
    files); the writer's reply pipe may then be numbered 1024 or more, which
    select.select() refuses (FD_SETSIZE): every submit would fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}")
    if soft != resource.RLIM_INFINITY and soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    path = database(tmp_path)
    fillers = []
    try:
        while not fillers or fillers[-1] < 1030:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        w = WriterProcess(str(path), 5.0, max_pending=1 << 20)
        first = w.submit([("execute", INSERT, ("a", "1"))], 1)
        assert w._replies is not None and w._replies.fileno() >= 1024
        second = w.submit([("execute", INSERT, ("b", "1"))], 1)  # reads answers first
        assert w.wait_all() == {first: None, second: None}
        w.close()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert table(path) == [("a", "1"), ("b", "1")]


def test_a_writer_that_cannot_start_is_a_temporary_failure_naming_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No process or descriptor left to start the writer (EAGAIN, EMFILE): the
    environment failed, not the message; a spooled message's process() raises a
    TemporaryFailure (retried, not counted towards its quarantine as an OSError
    is), and the store is named."""

    def no_process(*args: object, **kwargs: object) -> None:
        raise OSError(24, "Too many open files")

    s = store(tmp_path)
    s.SPOOLED_IN_CHUNK = 0  # (written by its process(), not sent in a chunk)
    big = make_message("1", "one", "body")
    spooled_at = tmp_path / "1.eml"
    spooled_at.write_bytes(big.raw)
    m = parsed(Message(ref=big.ref, spool_path=spooled_at))
    with monkeypatch.context() as patched:
        patched.setattr(subprocess, "Popen", no_process)
        with pytest.raises(
            TemporaryFailure, match=r"store\.sqlite.*Too many open.*writer = \"thread\""
        ):
            s.process(m)
    s.process(m)
    s.close()
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(1,)]


def test_a_spooled_message_up_to_spooled_in_chunk_goes_in_a_chunk(
    tmp_path: Path,
) -> None:
    """Issue 18: its bytes are read and sent with the chunk, so process() does not
    wait for the writer, and the spool file may be gone before the chunk is written;
    a larger one is written by its process() from the spool file."""
    s = store(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    spooled = []
    for uid, lines in (("small", 10), ("large", 100)):
        m = make_message(uid, f"spooled {uid}", f"{uid} body\n" * lines)
        path = spool / f"{uid}.eml"
        path.write_bytes(m.raw)
        spooled.append(parsed(Message(ref=m.ref, spool_path=path)))
    small, large = spooled
    small_raw = small.raw
    s.SPOOLED_IN_CHUNK = small.size
    assert large.size > small.size
    s.process(small)
    assert small.spool_path is not None
    small.spool_path.unlink()  # (the engine's _unspool after the chain)
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]  # held
    s.process(large)
    assert rows(tmp_path, "SELECT key FROM messages") == [(large.key,)]  # written now
    s.flush()
    assert rows(tmp_path, "SELECT key, raw FROM message_raw ORDER BY key") == sorted(
        [(small.key, small_raw), (large.key, large.raw)]
    )
    s.close()


def test_with_the_writer_thread_a_small_spooled_message_is_written_by_its_process(
    tmp_path: Path,
) -> None:
    """SPOOLED_IN_CHUNK is for writer = "process" only: with "thread" a spooled message
    is still its own transaction, durable when process() returns (not held in memory
    until flush())."""
    s = store(tmp_path, writer="thread")
    m = make_message("small", "spooled small", "small body\n")
    path = tmp_path / "small.eml"
    path.write_bytes(m.raw)
    spooled = parsed(Message(ref=m.ref, spool_path=path))
    assert spooled.size <= s.SPOOLED_IN_CHUNK
    s.process(spooled)
    assert rows(tmp_path, "SELECT key, raw FROM message_raw") == [(m.key, m.raw)]
    s.close()
