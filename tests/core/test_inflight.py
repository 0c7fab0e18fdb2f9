"""The in-flight marker survives its process: what the next poll reads back."""

from __future__ import annotations

from pathlib import Path

from mailpipe.inflight import InflightMarker


def test_a_uid_left_set_is_taken_once_by_the_next_process(tmp_path: Path) -> None:
    dying = InflightMarker(tmp_path, "support")
    dying.set("a-much-longer-uid-first")
    dying.set("uid-2")  # shorter than the last one: nothing of it is left over
    del dying  # the process dies without clear() or close()

    nxt = InflightMarker(tmp_path, "support")
    assert nxt.take() == "uid-2"
    assert nxt.take() is None  # taken: counted once
    nxt.set("uid-3")
    nxt.clear()
    assert nxt.take() is None
    nxt.close()


def test_markers_are_per_mailbox(tmp_path: Path) -> None:
    a, b = InflightMarker(tmp_path, "a"), InflightMarker(tmp_path, "b/../a")
    a.set("x")
    assert b.take() is None and a.take() == "x"
    assert a.path.parent == tmp_path and a.path.name.startswith(".inflight-")


def test_the_marker_outlives_a_sigkilled_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import os, signal, sys; from pathlib import Path;"
        "from mailpipe.inflight import InflightMarker;"
        "InflightMarker(Path(sys.argv[1]), 'box').set('uid-9');"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    assert done.returncode == -9
    assert InflightMarker(tmp_path, "box").take() == "uid-9"
