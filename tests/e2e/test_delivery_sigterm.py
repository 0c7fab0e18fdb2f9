"""Delivery proof 8e: SIGTERM in the middle of a run against a real Dovecot.

The run (``--once`` or the daemon) is stopped while it is working through one long
session (300 messages, the default commit window, several group commits of 64 with
RETR replies still in flight). It must exit 0 after finishing the message in hand,
DELE what it committed and QUIT; the journal then holds no half-done entry (only ones
seen but never started), and the next run delivers the rest: every message stored and
processed exactly once.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from mailpipe.journal.base import Status
from mailpipe.testing.dovecot import Dovecot
from mailpipe.testing.e2e import (
    delivery_message,
    journal_entries,
    key_log_step,
    line_counts,
    log_events,
    maildir_key_numbers,
    maildir_numbers,
    run_mailpipe,
    server_numbers,
    sqlite_numbers,
    start_mailpipe,
    store_steps,
    wait_until,
    write_pipeline,
)

pytestmark = [pytest.mark.dovecot, pytest.mark.slow, pytest.mark.timeout(600)]

MESSAGES = 300
STOP_AFTER = 40  # stored messages before SIGTERM is sent


@pytest.mark.parametrize("mode", ["once", "daemon"])
def test_sigterm_mid_run_exits_cleanly_and_the_next_run_finishes(
    dovecot: Dovecot, tmp_path: Path, mode: str
) -> None:
    user = dovecot.add_user()
    for n in range(MESSAGES):
        dovecot.deliver(user, delivery_message(n))
    out = tmp_path / "out"
    keylog = tmp_path / "forwarded.log"
    config = write_pipeline(
        tmp_path,
        dovecot=dovecot,
        user=user,
        processors=[*store_steps(out), key_log_step(keylog)],
    )
    log_path = tmp_path / "run.log"
    args = ("run", "{config}", "--once") if mode == "once" else ("run", "{config}")
    with log_path.open("wb") as log:
        proc = start_mailpipe(config, *args, log=log)
        try:
            reached = wait_until(
                lambda: (
                    proc.poll() is not None or len(line_counts(keylog)) >= STOP_AFTER
                ),
                timeout=180,
            )
            assert reached and proc.poll() is None, log_path.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    events = log_events(text)
    assert not [e for e in events if e.get("level") in ("warning", "error")], text[
        -3000:
    ]

    # Stopped cleanly: what was processed is stored, journaled and deleted; the rest
    # is untouched on the server; nothing is half-done.
    stored = maildir_numbers(out / "maildir")
    on_server = server_numbers(dovecot, user)
    assert STOP_AFTER <= sum(stored.values()) < MESSAGES
    assert set(stored.values()) == {1}
    assert stored + on_server == Counter(range(MESSAGES))  # disjoint and complete
    assert sqlite_numbers(out / "store.sqlite3") == stored
    keys = maildir_key_numbers(out / "maildir")
    entries = journal_entries(tmp_path / "var" / "journal.sqlite3")
    done = [e for e in entries if e.key in keys]
    assert len(done) == len(keys)
    assert {e.status for e in done} == {Status.DELETED}
    # Anything else the journal knows was seen but never started (a drained chunk).
    untouched = [e for e in entries if e.key not in keys]
    assert all(
        (e.status, e.attempts, e.steps, e.delete_due) == (Status.PENDING, 0, [], False)
        for e in untouched
    ), untouched
    assert len(untouched) <= sum(on_server.values())
    forwarded = line_counts(keylog)
    assert set(forwarded) == set(keys) and set(forwarded.values()) == {1}
    stopped_at = len(keys)

    final = run_mailpipe(config, "run", "{config}", "--once")
    assert final.returncode == 0, final.stderr[-3000:]
    everything = Counter(range(MESSAGES))
    assert dovecot.mailbox_count(user) == 0
    assert maildir_numbers(out / "maildir") == everything
    assert sqlite_numbers(out / "store.sqlite3") == everything
    keys = maildir_key_numbers(out / "maildir")
    forwarded = line_counts(keylog)
    assert set(forwarded) == set(keys) and set(forwarded.values()) == {1}
    entries = journal_entries(tmp_path / "var" / "journal.sqlite3")
    assert len(entries) == MESSAGES
    assert {e.status for e in entries} == {Status.DELETED}
    print(f"\nmode={mode} stopped after {stopped_at} of {MESSAGES} messages")


def test_one_session_with_several_group_commits_empties_the_mailbox(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """commit_window = 0: one session, group commits of 64 while RETRs are pipelined."""
    user = dovecot.add_user()
    for n in range(150):
        dovecot.deliver(user, delivery_message(n))
    out = tmp_path / "out"
    config = write_pipeline(
        tmp_path,
        dovecot=dovecot,
        user=user,
        processors=store_steps(out),
        mailbox={"commit_window": 0},
    )
    run = run_mailpipe(config, "run", "{config}", "--once")
    assert run.returncode == 0, run.stderr[-3000:]
    finished = [
        e for e in log_events(run.stderr) if e.get("event") == "session_finished"
    ]
    # One session for all 150, and no T-44 follow-up: Dovecot lists everything.
    assert [(e["sessions"], e["retrieved"], e["deleted"]) for e in finished] == [
        (1, 150, 150)
    ]
    assert dovecot.mailbox_count(user) == 0
    assert maildir_numbers(out / "maildir") == Counter(range(150))
