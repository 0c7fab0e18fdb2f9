"""Delivery proof 8a: `mailpipe run --once` SIGKILLed at random instants, then run to the
end against a real Dovecot: every message stored exactly once (by key), none missing, the
mailbox empty. Run once over POP3 and once over IMAP (issue 14's proof: the same
Maildir served by Dovecot imapd, acknowledged by UID STORE + UID EXPUNGE).

Each run is killed a random 0.05 to 1.5 s after its session opened (the CLI takes
seconds to import, so an instant counted from the spawn would mostly hit start-up).
The seed is printed; set ``MAILPIPE_E2E_SEED`` to replay a sequence. When the mailbox
drains before enough kills happened (a fast machine), fresh messages are delivered so
that every kill hits a run with work left.
"""

from __future__ import annotations

import os
import random
import signal
import time
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
    maildir_keys,
    maildir_numbers,
    run_mailpipe,
    server_numbers,
    sqlite_keys,
    sqlite_numbers,
    start_mailpipe,
    store_steps,
    wait_for_log,
    write_pipeline,
)

pytestmark = [pytest.mark.dovecot, pytest.mark.slow, pytest.mark.timeout(900)]

MESSAGES = 520
KILLS = 24  # the issue asks for 20 or more
TOP_UP = 260  # delivered when fewer than LOW are left and kills are still due
LOW = 60
MAX_RUNS = 80  # bound: runs that end on their own (nothing left) do not count as kills


@pytest.mark.parametrize("source", ["pop3", "imap"])
def test_sigkill_at_random_instants_stores_every_message_exactly_once(
    request: pytest.FixtureRequest, source: str, tmp_path: Path
) -> None:
    dovecot: Dovecot = request.getfixturevalue(
        "dovecot_imap" if source == "imap" else "dovecot"
    )
    over_imap = {"source": "imap", "port": dovecot.imap_port} if source == "imap" else {}
    seed = int(
        os.environ.get("MAILPIPE_E2E_SEED") or random.SystemRandom().getrandbits(32)
    )
    print(f"\nseed={seed} (MAILPIPE_E2E_SEED to replay)")
    rng = random.Random(seed)
    user = dovecot.add_user()
    delivered = 0

    def deliver(count: int) -> None:
        nonlocal delivered
        for n in range(delivered, delivered + count):
            dovecot.deliver(user, delivery_message(n))
        delivered += count

    deliver(MESSAGES)
    out = tmp_path / "out"
    keylog = tmp_path / "forwarded.log"
    config = write_pipeline(
        tmp_path,
        dovecot=dovecot,
        user=user,
        processors=[*store_steps(out), key_log_step(keylog)],
        mailbox={"commit_window": 20, **over_imap},
    )
    logs = tmp_path / "logs"
    logs.mkdir()

    kills = 0
    rows: list[str] = []
    started = time.monotonic()
    for run in range(MAX_RUNS):
        if kills >= KILLS:
            break
        if sum(server_numbers(dovecot, user).values()) < LOW:
            deliver(TOP_UP)
        log_path = logs / f"run-{run:02d}.log"
        with log_path.open("wb") as log:
            proc = start_mailpipe(config, "run", "{config}", "--once", log=log)
            try:
                opened = wait_for_log(
                    proc, log_path, f"{source}_session_opened".encode(), timeout=120
                )
                assert opened, f"run {run} opened no session:\n{log_path.read_text()}"
                delay = rng.uniform(0.05, 1.5)
                time.sleep(delay)
                alive = proc.poll() is None
                if alive:
                    proc.send_signal(signal.SIGKILL)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(30)
        kills += alive
        if not alive:
            assert proc.returncode == 0, log_path.read_text()[-3000:]

        # At every instant, each message is on the server or durably in both stores.
        stored = maildir_numbers(out / "maildir")
        in_sqlite = sqlite_numbers(out / "store.sqlite3")
        on_server = server_numbers(dovecot, user)
        lost = [
            n
            for n in range(delivered)
            if not on_server[n] and not (stored[n] and in_sqlite[n])
        ]
        assert not lost, f"seed {seed}, after run {run}: lost {lost[:20]}"
        assert max(stored.values(), default=1) == 1, (
            f"seed {seed}: a message stored twice"
        )
        rows.append(
            f"run {run:2d}  delay {delay:4.2f}s  {'KILLED' if alive else 'ended '}  "
            f"stored {sum(stored.values()):4d}  on server {sum(on_server.values()):4d}"
        )
    assert kills >= KILLS, f"only {kills} kills in {MAX_RUNS} runs"

    final = run_mailpipe(config, "run", "{config}", "--once", timeout=600)
    elapsed = time.monotonic() - started
    assert final.returncode == 0, final.stderr[-3000:]

    everything = Counter(range(delivered))
    assert dovecot.mailbox_count(user) == 0
    assert maildir_numbers(out / "maildir") == everything
    assert sqlite_numbers(out / "store.sqlite3") == everything
    keys = maildir_keys(out / "maildir")
    assert len(keys) == delivered and set(keys.values()) == {1}
    assert sqlite_keys(out / "store.sqlite3") == keys
    entries = journal_entries(tmp_path / "var" / "journal.sqlite3")
    assert {e.key for e in entries} == set(keys)
    assert {e.status for e in entries} == {Status.DELETED}
    forwarded = line_counts(keylog)
    assert set(forwarded) == set(keys)  # at least once; re-runs counted below

    again = sum(c - 1 for c in forwarded.values())
    summary = [
        e for e in log_events(final.stderr) if e.get("event") == "session_finished"
    ]
    per_message = (
        summary[-1]["seconds"] / summary[-1]["retrieved"]
        if summary and summary[-1]["retrieved"]
        else float("nan")
    )
    print("\n".join(rows))
    print(
        f"seed={seed} messages={delivered} kills={kills} runs={len(rows) + 1} "
        f"total={elapsed:.1f}s final_run_retrieved={summary[-1]['retrieved'] if summary else 0} "
        f"per_message={per_message * 1000:.1f}ms processed_again={again} "
        f"(messages forwarded more than once: {sum(c > 1 for c in forwarded.values())})"
    )
