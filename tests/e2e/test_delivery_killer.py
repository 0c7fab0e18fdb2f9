"""A message that kills the mailpipe process (not just raises) counts attempts too.

``killer_sink.py`` (a forward.command step) sends SIGKILL to mailpipe when it sees
message 17, as a crash in a C extension or the OOM killer would. Each run dies there;
the next run finds message 17 in the in-flight marker and counts an attempt; once
``max_attempts`` is spent, message 17 is quarantined without running its chain again
and the others are delivered: a poison message never stops the mailbox for good.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from mailpipe.journal.base import Status
from mailpipe.testing.dovecot import Dovecot
from mailpipe.testing.e2e import (
    delivery_message,
    journal_entries,
    maildir_numbers,
    run_mailpipe,
    server_numbers,
    store_steps,
    write_pipeline,
)

pytestmark = [pytest.mark.dovecot, pytest.mark.slow, pytest.mark.timeout(600)]

SINK = Path(__file__).resolve().with_name("killer_sink.py")
MESSAGES = range(1, 41)
KILLER = 17
MAX_ATTEMPTS = 3


def test_a_message_that_kills_the_process_is_quarantined_after_max_attempts(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    user = dovecot.add_user()
    for n in MESSAGES:
        dovecot.deliver(user, delivery_message(n))
    out = tmp_path / "out"
    sinklog = tmp_path / "sink.log"
    forward = {
        "use": "forward.command",
        "command": [sys.executable, "-I", "-S", str(SINK), str(sinklog), str(KILLER)],
    }
    config = write_pipeline(
        tmp_path,
        dovecot=dovecot,
        user=user,
        processors=[*store_steps(out), forward],
        mailbox={"max_attempts": MAX_ATTEMPTS, "on_quarantine": "delete"},
    )
    codes = []
    for _ in range(MAX_ATTEMPTS + 2):  # bounded: 3 deaths, then one clean run
        run = run_mailpipe(config, "run", "{config}", "--once")
        codes.append(run.returncode)
        if run.returncode == 0:
            break
    assert codes == [-9] * MAX_ATTEMPTS + [0], codes

    # Nothing lost, nothing twice: every other message delivered and forwarded once.
    assert server_numbers(dovecot, user) == Counter()
    stored = maildir_numbers(out / "maildir")
    # The store step ran before the kill: it may hold message 17 (once, by key).
    assert stored[KILLER] <= 1
    del stored[KILLER]
    assert stored == Counter({n: 1 for n in MESSAGES if n != KILLER})
    lines = Counter(tuple(line.split()) for line in sinklog.read_text().splitlines())
    assert lines == Counter(
        {(str(n), "ok"): 1 for n in MESSAGES if n != KILLER}
        | {(str(KILLER), "kill"): MAX_ATTEMPTS}
    )

    # Message 17: its attempts were counted across deaths, then it was quarantined
    # (raw bytes kept, with the reason) and deleted from the server.
    (entry,) = [
        e for e in journal_entries(tmp_path / "var" / "journal.sqlite3")
        if e.status != Status.DELETED or e.attempts
    ]
    assert entry.attempts == MAX_ATTEMPTS and "process died" in entry.last_error
    (sidecar,) = (tmp_path / "var" / "quarantine").rglob("*.json")
    meta = json.loads(sidecar.read_text())
    assert meta["attempts"] == MAX_ATTEMPTS
    assert "died 3 time(s)" in meta["reason"]
    eml = sidecar.with_suffix(".eml").read_bytes()
    assert b"Message-ID: <delivery-17@mailpipe.test>" in eml
