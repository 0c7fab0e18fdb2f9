"""Delivery proof 8c: a processor that fails on one message in 50, against a real Dovecot.

The failing step is ``forward.command`` running ``delivery_sink.py``, which refuses
``Subject: delivery N`` with N % 50 == 0 until a "fixed" marker file exists. The other
messages are delivered and deleted on the first run; the failing ones stay on the
server, are retried, and are quarantined after ``max_attempts``; after the fix,
``mailpipe quarantine replay CONFIG --all`` delivers them, and the journal records it.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from mailpipe.journal.base import Entry, Status
from mailpipe.testing.dovecot import Dovecot
from mailpipe.testing.e2e import (
    delivery_message,
    journal_entries,
    maildir_key_numbers,
    maildir_keys,
    maildir_numbers,
    run_mailpipe,
    server_numbers,
    sqlite_numbers,
    store_steps,
    write_pipeline,
)

pytestmark = [pytest.mark.dovecot, pytest.mark.slow, pytest.mark.timeout(600)]

SINK = Path(__file__).resolve().with_name("delivery_sink.py")
MESSAGES = range(1, 151)  # 1..150
FAILING = {50, 100, 150}
MAX_ATTEMPTS = 3
STEPS = [
    "default/0:store.maildir",
    "default/1:store.sqlite",
    "default/2:forward.command",
]


def sink_lines(path: Path) -> Counter[tuple[int, str]]:
    """(number, "ok"|"fail") -> how many times the sink saw it."""
    out: Counter[tuple[int, str]] = Counter()
    for line in path.read_text().splitlines():
        _key, outcome, number = line.split()
        out[int(number), outcome] += 1
    return out


def by_number(entries: list[Entry], keys: dict[str, int]) -> dict[int, Entry]:
    return {keys[e.key]: e for e in entries}


@pytest.mark.parametrize("on_quarantine", ["delete", "keep"])
def test_failing_messages_are_quarantined_then_replayed(
    dovecot: Dovecot, tmp_path: Path, on_quarantine: str
) -> None:
    user = dovecot.add_user()
    for n in MESSAGES:
        dovecot.deliver(user, delivery_message(n))
    out = tmp_path / "out"
    sinklog = tmp_path / "sink.log"
    fixed = tmp_path / "fixed"
    forward = {
        "use": "forward.command",
        "command": [
            sys.executable,
            "-I",
            "-S",
            str(SINK),
            str(sinklog),
            "50",
            str(fixed),
        ],
    }
    config = write_pipeline(
        tmp_path,
        dovecot=dovecot,
        user=user,
        processors=[*store_steps(out), forward],
        mailbox={"max_attempts": MAX_ATTEMPTS, "on_quarantine": on_quarantine},
    )
    journal = tmp_path / "var" / "journal.sqlite3"

    # Run 1: the others are delivered (forwarded once) and deleted from the server.
    first = run_mailpipe(config, "run", "{config}", "--once")
    assert first.returncode in (0, 1), first.stderr[-3000:]
    assert set(server_numbers(dovecot, user)) == FAILING
    seen = sink_lines(sinklog)
    assert {n for (n, outcome) in seen if outcome == "ok"} == set(MESSAGES) - FAILING
    assert all(c == 1 for c in seen.values())
    keys = maildir_key_numbers(out / "maildir")
    entries = by_number(journal_entries(journal), keys)
    for n in FAILING:
        e = entries[n]
        assert (e.status, e.attempts) == (Status.PENDING, 1), e
        assert e.steps == STEPS[:2]  # the stores committed; only forward is retried
        assert "refusing message" in e.last_error
    assert all(entries[n].status == Status.DELETED for n in set(MESSAGES) - FAILING)

    # Runs 2 and 3: retried; quarantined when max_attempts is reached.
    for attempt in range(2, MAX_ATTEMPTS + 1):
        run = run_mailpipe(config, "run", "{config}", "--once")
        assert run.returncode in (0, 1), run.stderr[-3000:]
        entries = by_number(journal_entries(journal), keys)
        expected = Status.QUARANTINED if attempt == MAX_ATTEMPTS else Status.PENDING
        if attempt == MAX_ATTEMPTS and on_quarantine == "delete":
            expected = Status.DELETED  # quarantined, then DELE'd at QUIT
        assert {(entries[n].status, entries[n].attempts) for n in FAILING} == {
            (expected, attempt)
        }
    assert sink_lines(sinklog) == Counter(
        {(n, "ok"): 1 for n in set(MESSAGES) - FAILING}
        | {(n, "fail"): MAX_ATTEMPTS for n in FAILING}
    )
    on_server = set(server_numbers(dovecot, user))
    assert on_server == (set() if on_quarantine == "delete" else FAILING)
    listed = run_mailpipe(config, "quarantine", "list", "{config}")
    assert listed.returncode == 0, listed.stderr
    quarantined = {
        line.split()[0] for line in listed.stdout.splitlines() if line.strip()
    }
    assert {keys[k] for k in quarantined} == FAILING

    # A replay before the fix fails again and keeps them quarantined.
    early = run_mailpipe(config, "quarantine", "replay", "{config}", "--all")
    assert early.returncode == 1
    assert early.stdout.count("failed in default/2:forward.command") == len(FAILING)

    # The fix, then the replay: delivered, out of quarantine, recorded in the journal.
    fixed.touch()
    replay = run_mailpipe(config, "quarantine", "replay", "{config}", "--all")
    assert replay.returncode == 0, replay.stdout + replay.stderr[-3000:]
    assert replay.stdout.count("replayed") == len(FAILING)
    after = run_mailpipe(config, "quarantine", "list", "{config}")
    assert after.stdout.strip() == ""
    entries = by_number(journal_entries(journal), keys)
    for n in FAILING:
        e = entries[n]
        assert e.steps == STEPS, e
        if on_quarantine == "delete":
            assert e.status == Status.DELETED, e  # the server copy is already gone
        else:
            # Kept on the server while quarantined: now COMMITTED, the DELE owed.
            assert (e.status, e.reason, e.delete_due) == (
                Status.COMMITTED,
                "replayed",
                True,
            )
    seen = sink_lines(sinklog)
    assert {n for (n, outcome) in seen if outcome == "ok"} == set(MESSAGES)
    assert all(seen[n, "ok"] == 1 for n in MESSAGES)

    # The next poll deletes a kept copy without running the pipeline again.
    final = run_mailpipe(config, "run", "{config}", "--once")
    assert final.returncode == 0, final.stderr[-3000:]
    assert dovecot.mailbox_count(user) == 0
    assert {e.status for e in journal_entries(journal)} == {Status.DELETED}
    assert sink_lines(sinklog) == seen
    everything = Counter(MESSAGES)
    assert maildir_numbers(out / "maildir") == everything
    assert sqlite_numbers(out / "store.sqlite3") == everything
    assert set(maildir_keys(out / "maildir").values()) == {1}
    print(
        f"\non_quarantine={on_quarantine} messages={len(MESSAGES)} failing={len(FAILING)} "
        f"exit codes of the failing runs: {first.returncode}, {run.returncode}"
    )
