"""The in-flight marker survives its process: what the next poll reads back."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mailpipe.inflight as inflight
from mailpipe.inflight import InflightMarker


def as_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on this test runs as a later process (a new token)."""
    monkeypatch.setattr(inflight, "_TOKEN", os.urandom(4))
    inflight._ACTIVE.clear()


def test_a_uid_left_set_is_taken_once_by_the_next_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dying = InflightMarker(tmp_path, "support")
    dying.set("a-much-longer-uid-first")
    dying.clear()
    dying.set("uid-2")  # shorter than the last one: nothing of it is left over
    assert dying.take() is None  # never its own process's marker
    as_another_process(monkeypatch)

    nxt = InflightMarker(tmp_path, "support")
    assert nxt.take() == ("uid-2", True)
    assert nxt.take() is None  # taken: counted once
    nxt.set("uid-3")
    nxt.clear()
    as_another_process(monkeypatch)
    assert InflightMarker(tmp_path, "support").take() is None
    dying.close()
    nxt.close()


def test_overlapping_chains_are_never_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = (InflightMarker(tmp_path, name) for name in "abc")
    a.set("a1")
    b.set("b1")  # runs beside a1: neither a1 nor b1 can be blamed alone
    b.clear()
    c.set("c1")  # a1 is still in flight
    c.clear()
    c.set("c2")
    c.clear()
    a.clear()
    c.set("c3")  # alone from start to death
    as_another_process(monkeypatch)
    assert InflightMarker(tmp_path, "a").take() is None  # cleared
    assert InflightMarker(tmp_path, "c").take() == ("c3", True)
    a.set("a2")
    b.set("b2")
    as_another_process(monkeypatch)
    assert InflightMarker(tmp_path, "a").take() == ("a2", False)
    assert InflightMarker(tmp_path, "b").take() == ("b2", False)


def test_a_process_that_lost_its_lease_does_not_clear_the_new_owners_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = InflightMarker(tmp_path, "box")
    old.set("u1")
    token = inflight._TOKEN
    as_another_process(monkeypatch)
    new = InflightMarker(tmp_path, "box")
    assert new.take() == ("u1", True)
    new.set("u2")
    monkeypatch.setattr(inflight, "_TOKEN", token)  # the old process finishes u1
    old.clear()
    as_another_process(monkeypatch)
    assert InflightMarker(tmp_path, "box").take() == ("u2", True)


def test_the_page_is_allocated_so_a_full_disk_cannot_raise_sigbus(tmp_path: Path) -> None:
    m = InflightMarker(tmp_path, "box")
    m.set("u")
    st = m.path.stat()
    assert st.st_size == InflightMarker.SIZE
    assert st.st_blocks * 512 >= InflightMarker.SIZE  # real blocks, not a sparse hole
    assert st.st_mode & 0o777 == 0o600
    m.close()


def test_a_new_marker_is_allocated_without_waiting_for_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: the page need only outlive the process, so its creation makes no
    fsync (which held the event loop for each mailbox's first message); a full disk
    still fails the allocation, as an OSError, before anything is mapped."""

    def no_sync(fd: int) -> None:
        raise AssertionError("the marker was fsynced")

    monkeypatch.setattr(os, "fsync", no_sync)
    m = InflightMarker(tmp_path, "box")
    m.set("u")
    assert m.path.stat().st_blocks * 512 >= InflightMarker.SIZE
    m.close()

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    other = InflightMarker(tmp_path, "other")
    with pytest.raises(OSError, match="No space left"):
        other.set("u")
    assert other._map is None


def test_markers_are_per_mailbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = InflightMarker(tmp_path, "a"), InflightMarker(tmp_path, "b/../a")
    a.set("x")
    as_another_process(monkeypatch)
    assert InflightMarker(tmp_path, "b/../a").take() is None
    assert InflightMarker(tmp_path, "a").take() == ("x", True)
    assert a.path.parent == tmp_path and a.path.name.startswith(".inflight-")
    assert b.path != a.path


def test_the_marker_outlives_a_sigkilled_process(tmp_path: Path) -> None:
    code = (
        "import os, signal, sys; from pathlib import Path;"
        "from mailpipe.inflight import InflightMarker;"
        "InflightMarker(Path(sys.argv[1]), 'box').set('uid-9');"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    assert done.returncode == -9
    assert InflightMarker(tmp_path, "box").take() == ("uid-9", True)


def test_a_live_writer_is_never_charged_only_a_dead_one(tmp_path: Path) -> None:
    # A worker frozen or partitioned past its lease still lives: the new owner of the
    # mailbox must not charge its message a "process died" attempt (issue 16 review L1).
    code = (
        "import sys, time; from pathlib import Path;"
        "from mailpipe.inflight import InflightMarker;"
        "InflightMarker(Path(sys.argv[1]), 'box').set('uid-live');"
        "print('set', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "set"
        assert InflightMarker(tmp_path, "box").take() is None  # alive: not charged
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert InflightMarker(tmp_path, "box").take() == ("uid-live", True)  # dead now
