"""Exactly-once proof across workers (issue 16, point 4).

Three ``mailpipe run`` workers share one config, one PostgreSQL journal (a fresh schema)
and one set of stores: ``store.maildir``, ``store.mbox``, ``store.jsonl``,
``store.sqlite`` and ``store.attachments``, then a ``forward.command`` (appends
``<key> <worker pid>`` to a log) and a ``forward.webhook`` to an HTTP sink on
127.0.0.1. They drain Dovecot mailboxes while the test, at random instants, SIGKILLs a
worker (and starts a new one) or freezes one with SIGSTOP for longer than
``lease_ttl`` (its mailboxes are taken over meanwhile) and then lets it go on with
SIGCONT; more mail arrives between the events.

What must hold: every message in every store (0 missing), no message stored twice in
any store (by Message-ID), every mailbox empty, every journal entry finished. A worker
frozen mid-poll wakes up with its lease taken over: its journal batch is refused by
the fence (lease epoch) and it sends no DELE/QUIT; its late store writes find the keys
already stored. The forwarders are at-least-once: a message runs again when its worker
was killed or frozen after its forward and before its journal commit. Their repeats are
counted and printed; the webhook's all carry the same ``Idempotency-Key``, so a receiver
honouring the key (as the check below does) applies each message exactly once.

The seed is new for every run and printed; ``MAILPIPE_E2E_SEED`` replays one.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections import Counter
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.store.mbox import read_entries

from mailpipe.journal.base import Status
from mailpipe.journal.postgres import PostgresJournal
from mailpipe.testing.dovecot import Dovecot, DovecotUser
from mailpipe.testing.e2e import (
    Workers,
    e2e_seed,
    key_log_step,
    log_events,
    maildir_keys,
    sqlite_keys,
    wait_until,
    write_workers_config,
)
from mailpipe.testing.sinks import HttpSink

pytestmark = [
    pytest.mark.dovecot,
    pytest.mark.services,
    pytest.mark.slow,
    pytest.mark.timeout(300),
]

PG_DSN = os.environ.get(
    "MAILPIPE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
USERS = 6
PER_USER = 12
WORKERS = 3
EVENTS = 6  # random SIGKILLs and SIGSTOP/SIGCONT pauses
TOP_UP = 8  # messages delivered to random mailboxes before each event
LEASE_TTL = 2.0
DRAIN_TIMEOUT = 120.0


def make_message(number: int) -> bytes:
    """A small message; every third carries an attachment (for store.attachments)."""
    msg = EmailMessage()
    msg["From"] = f"Sender {number % 5} <sender{number % 5}@example.com>"
    msg["To"] = "pipeline@example.org"
    msg["Subject"] = f"fence {number}"
    msg["Message-ID"] = f"<fence-{number}@mailpipe.test>"
    msg.set_content(f"Message {number} of the exactly-once proof.\n")
    if number % 3 == 0:
        msg.add_attachment(f"attachment of {number}\n".encode(), maintype="application",
                           subtype="octet-stream", filename=f"a{number}.bin")
    return msg.as_bytes(policy=SMTP)


def write_config(
    directory: Path, *, dovecot: Dovecot, users: list[DovecotUser], schema: str,
    shared: Path, webhook: str, source: str = "pop3",
) -> Path:
    steps: list[dict[str, Any]] = [
        {"use": "parse"},
        {"use": "store.maildir", "path": str(shared / "maildir")},
        {"use": "store.mbox", "path": str(shared / "box.mbox")},
        {"use": "store.jsonl", "path": str(shared / "box.jsonl")},
        {"use": "store.sqlite", "path": str(shared / "store.sqlite3"), "raw": "none"},
        {"use": "store.attachments", "dir": str(shared / "attachments")},
        key_log_step(shared / "forwarded.log", pid=True),
        {"use": "forward.webhook", "url": webhook, "retries": 5, "backoff": "0.2s"},
    ]
    return write_workers_config(
        directory, dovecot=dovecot, users=users,
        journal=f"{PG_DSN}?schema={schema}", processors=steps,
        scheduler={"concurrency": 10, "lease_ttl": LEASE_TTL,
                   "backoff_initial": 0.3, "backoff_max": 1.5},
        mailbox={"poll_interval": 0.5, "jitter": 0.2, "read_timeout": 30.0,
                 **(imap_move(dovecot) if source == "imap" else {})},
    )


def imap_move(dovecot: Dovecot) -> dict[str, Any]:
    """IMAP mailboxes acknowledged by moving to "Processed" (issue 16, point 5)."""
    return {"source": "imap", "port": dovecot.imap_port,
            "acknowledge": {"move": "Processed"}}


def message_id(raw: bytes) -> str:
    return str(message_from_bytes(raw)["Message-ID"]).strip().strip("<>")


@pytest.mark.parametrize("source", ["pop3", "imap"])
def test_workers_killed_and_paused_past_their_leases_store_every_message_once(
    source: str, request: pytest.FixtureRequest, tmp_path: Path, pg_schema_url: str
) -> None:
    # pop3: acknowledged by DELE + QUIT; imap: by UID MOVE to "Processed".
    dovecot: Dovecot = request.getfixturevalue(
        "dovecot_imap" if source == "imap" else "dovecot"
    )
    seed = e2e_seed()
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:6]
    users = [dovecot.add_user(f"fx{run}u{i}") for i in range(USERS)]
    expected: dict[str, str] = {}  # Message-ID -> mailbox
    attached: set[str] = set()  # Message-IDs with an attachment

    def deliver(user: DovecotUser) -> None:
        number = len(expected) + 1
        dovecot.deliver(user, make_message(number))
        expected[f"fence-{number}@mailpipe.test"] = user.name
        if number % 3 == 0:
            attached.add(f"fence-{number}@mailpipe.test")

    for user in users:
        for _ in range(PER_USER):
            deliver(user)
    shared = tmp_path / "shared"
    schema = pg_schema_url.rsplit("schema=", 1)[1]
    logs = tmp_path / "logs"
    logs.mkdir()
    events: list[str] = []
    with HttpSink() as sink:
        config = write_config(tmp_path, dovecot=dovecot, users=users, schema=schema,
                              shared=shared, webhook=sink.url, source=source)
        workers = Workers(config, logs)
        try:
            for _ in range(WORKERS):
                workers.start()
            forwarded = shared / "forwarded.log"
            assert wait_until(
                lambda: forwarded.exists() and forwarded.stat().st_size > 0,
                timeout=60,
            ), workers.log_text()[-3000:]
            for _ in range(EVENTS):
                for user in rng.sample(users, min(TOP_UP, USERS)):
                    deliver(user)
                time.sleep(rng.uniform(0.2, 1.5))
                victim = rng.choice(workers.alive())
                if rng.random() < 0.5:
                    events.append("SIGKILL")
                    workers.kill(victim)
                    time.sleep(rng.uniform(0.0, 0.5))
                    workers.start()
                else:
                    pause = rng.uniform(1.3, 2.0) * LEASE_TTL
                    events.append(f"SIGSTOP {pause:.1f}s")
                    workers.pause(victim, pause)
            # A worker that exited by itself (not one this test killed) is a defect:
            # its exit code, the events so far and the logs' tail say which.
            exited = {p.pid: p.returncode for p in workers.procs
                      if p.poll() is not None and p.pid not in workers.killed}
            assert len(workers.alive()) == WORKERS, (
                f"exited by themselves: {exited}; events: {events}\n"
                + "\n".join(f"--- worker {pid}'s log ends:\n{workers.log_of(pid)[-4000:]}"
                            for pid in exited)
            )

            def drained() -> bool:
                return all(dovecot.mailbox_count(u) == 0 for u in users)

            assert wait_until(drained, timeout=DRAIN_TIMEOUT, interval=0.5), (
                f"{sum(dovecot.mailbox_count(u) for u in users)} messages left; "
                + workers.log_text()[-3000:]
            )
            assert wait_until(workers.running, timeout=60), workers.log_text()[-3000:]
            codes = workers.terminate_all()
            assert set(codes.values()) == {0}, codes
        finally:
            workers.close()
        requests = sink.requests
    print(f"events: {', '.join(events)}")

    # --- every store: each message exactly once, none missing --------------------
    jsonl = [json.loads(line) for line in (shared / "box.jsonl").read_text().splitlines()]
    key_to_mid = {d["key"]: d["message_id"] for d in jsonl}
    stored: dict[str, Counter[str]] = {
        "store.jsonl": Counter(d["message_id"] for d in jsonl),
        "store.maildir": Counter(
            message_id(p.read_bytes())
            for sub in ("new", "cur")
            for p in (shared / "maildir" / sub).iterdir()
        ),
        "store.mbox": Counter(
            message_id(raw) for _, raw in read_entries(shared / "box.mbox")
        ),
        "store.sqlite": Counter(
            key_to_mid.get(k, k) for k in sqlite_keys(shared / "store.sqlite3").elements()
        ),
        "store.attachments": Counter(
            key_to_mid.get(p.stem, p.stem)
            # (not the ".<name>.<pid>.<random>.tmp" a SIGKILL can leave beside them)
            for p in (shared / "attachments" / "manifests").glob("[!.]*.json")
        ),
    }
    assert set(key_to_mid.values()) == set(expected)
    for name, counts in stored.items():
        want = attached if name == "store.attachments" else set(expected)
        missing = want - set(counts)
        twice = {m: n for m, n in counts.items() if n > 1}
        assert not missing, (name, sorted(missing)[:10])
        assert not twice, (name, twice)
        assert set(counts) == want, (name, sorted(set(counts) - want)[:10])
    assert sum(maildir_keys(shared / "maildir").values()) == len(expected)
    if source == "imap":
        # Each message was moved exactly once: the "Processed" folder holds every
        # message of its mailbox once (a re-sent MOVE after a kill would move nothing,
        # a duplicate APPEND would show here).
        for user in users:
            moved = Counter(message_id(raw) for raw, _ in
                            dovecot.imap_messages(user, "Processed"))
            want = {m for m, box in expected.items() if box == user.name}
            assert set(moved) == want and max(moved.values(), default=1) == 1, (
                user.name, len(moved), len(want))

    # --- the journal: every message finished; deleted, or its DELE still owed ----
    journal = PostgresJournal(PG_DSN, schema=schema)
    try:
        entries = [e for u in users for e in journal.list(u.name, None, 1000)]
    finally:
        journal.close()
    assert {e.key for e in entries} == set(key_to_mid)
    assert {e.status for e in entries} <= {Status.DELETED, Status.COMMITTED}
    assert all(e.delete_due for e in entries if e.status == Status.COMMITTED)

    # --- the forwarders: at least once; repeats counted --------------------------
    runs = Counter(line.split()[0] for line in forwarded.read_text().splitlines())
    assert set(runs) == set(key_to_mid)
    command_repeats = sum(n - 1 for n in runs.values())
    posts = Counter(r.headers.get("idempotency-key") for r in requests
                    if r.status == 200)
    assert set(posts) == set(key_to_mid), "every message reached the webhook, keyed"
    webhook_repeats = sum(n - 1 for n in posts.values())
    # A receiver honouring Idempotency-Key applies the first request of each key and
    # drops the repeats: that is exactly-once only if a key always names the same
    # message (the repeats are the same document, never another message's).
    applied: dict[str, str] = {}
    for r in requests:
        if r.status != 200:
            continue
        key, mid = r.headers.get("idempotency-key", ""), str(r.json().get("message_id"))
        assert r.json().get("key") == key, "the body's key is the header's"
        assert applied.setdefault(key, mid) == mid, (key, applied[key], mid)
    assert sorted(applied.values()) == sorted(expected), "each message applied once"

    log = log_events(workers.log_text())
    # MP-07: a worker now survives an exception escaping a mailbox's loop, but it is
    # still a defect: the events carry their tracebacks.
    escaped = [e for e in log if e.get("event") == "mailbox_loop_failed"]
    assert not escaped, escaped
    fenced = sum(e.get("event") == "journal_batch_fenced" for e in log)
    lost = sum(
        e.get("event") in ("mailbox_lease_lost", "mailbox_lease_expired",
                           "mailbox_lease_fenced")
        for e in log
    )
    print(
        f"{len(expected)} messages, {USERS} mailboxes, {WORKERS} workers, seed {seed}: "
        f"0 missing, 0 stored twice in 5 stores; forward.command repeats "
        f"{command_repeats}, webhook repeats {webhook_repeats} (0 after the receiver's "
        f"Idempotency-Key de-duplication: {len(applied)} applied); leases lost "
        f"{lost}, batches fenced {fenced}"
    )
