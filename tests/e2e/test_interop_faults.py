"""Interop: header prefetch, connections cut mid-transfer and killed server sessions,
on six real servers.

A header-only rule (mailing lists are kept) decides on ``TOP n 0``; the rest is
fetched, stored byte for byte and deleted. A TCP proxy cuts the first connection in
the middle of the RETR stream (RST or FIN); the next poll finishes the job with every
message stored exactly once. A server session process killed mid-RETR is reported as
a lost connection during that RETR.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mailpipe.testing.e2e import Cut, CuttingProxy, log_events, wait_until
from mailpipe.testing.servers import server_class
from mailpipe.testing.servers.interop import (
    lab_pipeline,
    mailpipe_once,
    stored_messages,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

SERVERS = ["dovecot", "courier", "cyrus", "gnu", "solid", "popa3d"]


def message(i: int, *, listed: bool, lines: int = 40) -> bytes:
    """A small deterministic message; ``listed`` ones carry List-Id."""
    head = [
        b"From: sender%d@example.org" % i,
        b"To: box@example.org",
        b"Subject: interop %d" % i,
        b"Message-ID: <interop-%d@mailpipe.test>" % i,
        b"Date: Mon, 2 Jan 2023 10:00:%02d +0000" % (i % 60),
    ]
    if listed:
        head.append(b"List-Id: <list%d.example.org>" % i)
    body = [b".line %04d of message %d %s" % (n, i, b"x" * 50) for n in range(lines)]
    return b"\n".join([*head, b"", *body]) + b"\n"


@pytest.mark.parametrize("server", SERVERS)
def test_header_prefetch_keeps_lists_fetches_rest(
    lab_servers, tmp_path, server
) -> None:
    lab = lab_servers(server)
    lab.load([message(i, listed=i % 2 == 0) for i in range(6)])
    served = lab.served()
    listed = [m.raw for m in served if b"List-Id:" in m.raw]
    others = [m.raw for m in served if b"List-Id:" not in m.raw]
    steps = [
        {"use": "parse"},
        {
            "use": "filter",
            "rules": [
                {"name": "lists", "when": {"mailing_list": True}, "then": "keep"}
            ],
        },
    ]
    config = lab_pipeline(tmp_path, lab, *steps, security="none", header_prefetch=True)
    for poll in range(2):
        run, summary = mailpipe_once(config)
        assert run.returncode == 0, run.stderr[-3000:]
        assert summary["retrieved"] == (len(others) if poll == 0 else 0)
        assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(others)
        assert [m.raw for m in lab.messages()] == listed


@pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])
@pytest.mark.parametrize("server", SERVERS)
def test_cut_mid_retr_then_next_poll_completes(lab_servers, tmp_path, server, reset):
    lab = lab_servers(server)
    lab.load([message(i, listed=False, lines=60) for i in range(8)])
    served = Counter(m.raw for m in lab.served())
    # ~4.5 KB a message: 12,000 octets down is well inside the RETR stream.
    with CuttingProxy(lab.host, lab.pop3_port, [Cut(12_000, reset=reset)]) as proxy:
        config = lab_pipeline(
            tmp_path, lab, security="none", host=proxy.host, port=proxy.port
        )
        first, _ = mailpipe_once(config)
        assert proxy.cuts_done == 1
        # The cut session's server side may still be at work on the mailbox (Courier
        # renames each file it sends): the next poll's completeness is asserted only
        # once it is over (a poll meanwhile may find a listed message gone).
        lab.wait_sessions_ended()
        run, _ = mailpipe_once(config)
    assert run.returncode == 0, first.stderr[-2000:] + run.stderr[-2000:]
    assert Counter(stored_messages(tmp_path / "Maildir")) == served  # each once
    assert lab.messages() == []


def written(pid: int) -> int:
    """Octets process ``pid`` has written so far (0 once it is gone)."""
    try:
        io = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return 0
    return int(io.split("wchar:")[1].split()[0])


@pytest.mark.parametrize("server", SERVERS)
def test_killed_session_process_is_connection_lost_during_retr(
    lab_servers, tmp_path, server
) -> None:
    """SIGKILL of the server's session process once it has written 2 MB more of a
    24 MB mailbox: the poll fails naming the RETR it lost (not "Broken pipe"), and the
    next poll stores everything exactly once."""
    lab = lab_servers(server)
    lab.load([message(i, listed=False, lines=40_000) for i in range(6)])  # ~4 MB each
    served = Counter(m.raw for m in lab.served())
    config = lab_pipeline(tmp_path, lab, security="none")
    log = tmp_path / "run1.log"
    victim: list[int] = []

    # Session processes may be reused (Cyrus, Dovecot): count what each writes now.
    before = {p: written(p) for p in lab.server_pids(lab.session_process)}

    def busy_session() -> bool:
        pids = lab.server_pids(lab.session_process)
        victim[:] = [p for p in pids if written(p) - before.get(p, 0) > 2_000_000][:1]
        return bool(victim) or proc.poll() is not None

    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailpipe",
                "--log-format",
                "json",
                "run",
                str(config),
                "--once",
            ],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
        try:
            assert wait_until(busy_session, timeout=60) and victim, lab.server_pids("")
            os.kill(victim[0], signal.SIGKILL)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    finished = [e for e in log_events(text) if e.get("event") == "session_finished"]
    error = finished[-1].get("error") or ""
    assert "connection lost during RETR" in error, error
    assert "Broken pipe" not in text
    run, _ = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert Counter(stored_messages(tmp_path / "Maildir")) == served
    assert lab.messages() == []


@pytest.mark.parametrize(
    "server",
    [s for s in SERVERS if server_class(s).session_ends_with_connection],
)
def test_the_lab_sees_a_session_process_until_its_session_ends(lab_servers, server):
    """wait_sessions_ended (what the tests above rely on between polls) counts the
    session processes, not the listener that names them in its arguments."""
    lab = lab_servers(server)
    lab.wait_sessions_ended()
    assert lab.session_pids() == []
    with lab.reference() as ref:
        ref.messages()  # logged in: the session process runs
        running = lab.session_pids()
        assert len(running) == 1
        with pytest.raises(TimeoutError, match="still running"):
            lab.wait_sessions_ended(seconds=0.2)
    lab.wait_sessions_ended()
    assert lab.session_pids() == []
