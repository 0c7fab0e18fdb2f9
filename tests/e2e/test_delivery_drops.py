"""Delivery proof 8b: connections to a real Dovecot cut at random byte offsets, both ways.

A :class:`~mailpipe.testing.e2e.CuttingProxy` sits between `mailpipe run` (the daemon,
STLS) and Dovecot and cuts 25 connections after a random number of octets, server to
client (greeting, CAPA, STLS handshake, RETR bodies, DELE or QUIT replies) or client to
server (commands, up to the QUIT itself), with FIN or RST. The daemon retries after
each failure (more mail is delivered while cuts are still due and the mailbox runs
low); once 25 cuts happened and the mailbox is empty it is stopped with SIGTERM. Every
message is then stored exactly once (by key), none is missing.
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
    Cut,
    CuttingProxy,
    delivery_message,
    journal_entries,
    key_log_step,
    line_counts,
    log_events,
    maildir_keys,
    maildir_numbers,
    server_numbers,
    sqlite_keys,
    sqlite_numbers,
    start_mailpipe,
    store_steps,
    write_pipeline,
)

pytestmark = [pytest.mark.dovecot, pytest.mark.slow, pytest.mark.timeout(900)]

MESSAGES = 500
DROPS = 25
TOP_UP = 100  # delivered while cuts are still due and fewer than LOW are left
LOW = 60
MAX_MESSAGES = 1500


class DropPlan:
    """Cut connections until DROPS cuts happened, leaving about a quarter untouched.

    Server-to-client offsets fall in a session's first 30 KB over TLS (greeting, STLS
    handshake, listings, about 25 RETR replies; the DELE and QUIT replies of the last,
    short sessions); client-to-server ones anywhere in a session's commands (about
    1 KB with TLS, QUIT included).
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.proxy: CuttingProxy | None = None

    def __call__(self, number: int) -> Cut | None:
        rng = self.rng
        if self.proxy is None or self.proxy.cuts_done >= DROPS or rng.random() < 0.25:
            return None
        if rng.random() < 0.7:
            return Cut(rng.randrange(0, 30_000), "down", rng.random() < 0.5)
        return Cut(rng.randrange(0, 1_200), "up", rng.random() < 0.5)


def test_connection_drops_at_random_offsets_lose_and_duplicate_nothing(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    seed = int(
        os.environ.get("MAILPIPE_E2E_SEED") or random.SystemRandom().getrandbits(32)
    )
    print(f"\nseed={seed} (MAILPIPE_E2E_SEED to replay)")
    user = dovecot.add_user()
    delivered = 0

    def deliver(count: int) -> None:
        nonlocal delivered
        for n in range(delivered, delivered + count):
            dovecot.deliver(user, delivery_message(n))
        delivered += count

    deliver(MESSAGES)
    plan = DropPlan(random.Random(seed))
    out = tmp_path / "out"
    keylog = tmp_path / "forwarded.log"
    log_path = tmp_path / "daemon.log"
    with CuttingProxy(dovecot.host, dovecot.pop3_port, plan) as proxy:
        plan.proxy = proxy
        config = write_pipeline(
            tmp_path,
            dovecot=dovecot,
            user=user,
            processors=[*store_steps(out), key_log_step(keylog)],
            security="starttls",
            host=proxy.host,
            port=proxy.port,
            mailbox={"commit_window": 50, "read_timeout": 20.0},
            scheduler={
                "backoff_initial": 0.05,
                "backoff_max": 0.3,
                "backoff_auth": 0.3,
            },
        )
        started = time.monotonic()
        with log_path.open("wb") as log:
            proc = start_mailpipe(config, "run", "{config}", log=log)
            try:
                deadline = started + 600
                for _ in range(100_000):  # bounded by the deadline
                    assert proc.poll() is None, log_path.read_text()[-3000:]
                    left = dovecot.mailbox_count(user)
                    if proxy.cuts_done < DROPS:
                        if left < LOW and delivered < MAX_MESSAGES:
                            deliver(TOP_UP)
                    elif left == 0 and (
                        sum(maildir_numbers(out / "maildir").values()) == delivered
                    ):
                        break
                    assert time.monotonic() < deadline, (
                        f"seed {seed}: not finished; {proxy.cuts_done} cuts, "
                        f"{left} on server\n" + log_path.read_text()[-3000:]
                    )
                    time.sleep(0.2)
                elapsed = time.monotonic() - started
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(60) == 0, log_path.read_text()[-3000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
        records = list(proxy.records)

    cuts = [r for r in records if r.was_cut]
    assert len(cuts) >= DROPS, f"seed {seed}: only {len(cuts)} connections cut"
    everything = Counter(range(delivered))
    assert server_numbers(dovecot, user) == Counter()
    assert maildir_numbers(out / "maildir") == everything
    assert sqlite_numbers(out / "store.sqlite3") == everything
    keys = maildir_keys(out / "maildir")
    assert len(keys) == delivered and set(keys.values()) == {1}
    assert sqlite_keys(out / "store.sqlite3") == keys
    entries = journal_entries(tmp_path / "var" / "journal.sqlite3")
    assert {e.key for e in entries} == set(keys)
    for e in entries:
        # DELETED, or COMMITTED with the DELE owed when a QUIT reply was cut (the
        # server deleted it; the journal could not know).
        assert e.status == Status.DELETED or (
            e.status == Status.COMMITTED and e.delete_due
        ), e
    forwarded = line_counts(keylog)
    assert set(forwarded) == set(keys)

    events = log_events(log_path.read_text())
    crashed = [e for e in events if e.get("event") == "session_crashed"]
    assert not crashed, f"unexpected (untyped) errors: {crashed[:3]}"
    failures = Counter(
        e.get("error_type")
        for e in events
        if e.get("event") == "session_finished" and e.get("error")
    )
    print(
        f"seed={seed} messages={delivered} connections={len(records)} cuts={len(cuts)} "
        f"(down {sum(r.cut is not None and r.cut.direction == 'down' for r in cuts)}, "
        f"up {sum(r.cut is not None and r.cut.direction == 'up' for r in cuts)}, "
        f"rst {sum(r.cut is not None and r.cut.reset for r in cuts)}) "
        f"total={elapsed:.1f}s failed_polls={dict(failures)} "
        f"processed_again={sum(c - 1 for c in forwarded.values())} "
        f"journal_owed_after_lost_quit={sum(e.status == Status.COMMITTED for e in entries)}"
    )
