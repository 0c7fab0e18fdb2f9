"""Mailbox leases in the scheduler with the real PostgreSQL journal: renewal under the
ttl, a lost lease aborting the session before DELE/QUIT, bounded retries, takeover."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path

import pytest

from mailpipe.app import App, open_app
from mailpipe.chain import Chain
from mailpipe.engine import MailboxRunner
from mailpipe.journal import JournalError
from mailpipe.journal.base import Status
from mailpipe.journal.postgres import PostgresJournal
from mailpipe.leases import LeaseLostError, MailboxLease, lease_retry_delay
from mailpipe.plugin_manager import Hooks
from mailpipe.quarantine import Quarantine
from mailpipe.scheduler import Scheduler
from mailpipe.testing.faults import Faults
from mailpipe.testing.server import Pop3Server

pytestmark = [pytest.mark.timeout(120), pytest.mark.services]

PG_DSN = os.environ.get(
    "MAILPIPE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def pg_url(pg_schema_url: str) -> str:
    """A journal URL with a fresh schema (tests/conftest.py)."""
    return pg_schema_url


def msg(n: int) -> bytes:
    return (
        f"From: a{n}@example.com\r\nTo: b@example.com\r\n"
        f"Message-ID: <lease-{n}@example.com>\r\nSubject: lease {n}\r\n\r\nbody {n}\r\n"
    ).encode()


def write_config(
    tmp_path: Path,
    srv: Pop3Server,
    url: str,
    *,
    ttl: float,
    poll_interval: float = 0.05,
) -> App:
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(
        f"""
[state]
path = "{url}"
[quarantine]
dir = "var/quarantine"
[scheduler]
lease_ttl = {ttl}
backoff_initial = 0.2
[[mailboxes]]
name = "box"
host = "127.0.0.1"
port = {srv.port}
security = "tls"
ca_file = "{srv.ca_file}"
username = "user"
password = "pass"
poll_interval = {poll_interval}
jitter = 0.0
[pipelines.default]
processors = [{{ use = "store.jsonl", path = "var/out.jsonl" }}]
"""
    )
    return open_app(cfg)


def stored_keys(tmp_path: Path) -> list[str]:
    path = tmp_path / "var" / "out.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


def commands(srv: Pop3Server, session: int) -> list[str]:
    """The keywords of the client commands of one session (1-based)."""
    return [
        e.text.split(" ", 1)[0].upper()
        for e in srv.transcript.entries(session)
        if e.kind == "C"
    ]


class CountingJournal(PostgresJournal):
    """The real PostgreSQL journal, recording each lock attempt: when, and whether it
    took the lease (None: it raised). ``renew_down`` makes renewals fail (fault)."""

    attempts: list[tuple[float, bool | None]]
    renew_down = False

    def lock_mailbox(self, mailbox: str, *, owner: str, ttl: float) -> bool:
        try:
            took = super().lock_mailbox(mailbox, owner=owner, ttl=ttl)
        except JournalError:
            self.attempts.append((time.monotonic(), None))
            raise
        self.attempts.append((time.monotonic(), took))
        return took

    def renew_mailbox(self, mailbox: str, *, owner: str, ttl: float) -> bool:
        if self.renew_down:
            raise JournalError("PostgreSQL journal: server closed the connection")
        return super().renew_mailbox(mailbox, owner=owner, ttl=ttl)


def kill_backend(pid: int) -> None:
    """Terminate a server backend (as a PostgreSQL restart would) and wait for it."""
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(500):  # bounded: 5 s
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            if row is not None and row[0] == 0:
                return
            time.sleep(0.01)
    raise AssertionError(f"backend {pid} did not terminate")


def counting_journal(url: str) -> CountingJournal:
    journal = CountingJournal.from_url(url)
    assert isinstance(journal, CountingJournal)
    journal.attempts = []
    return journal


def make_runner(app: App, journal: PostgresJournal) -> tuple[MailboxRunner, Chain]:
    config = app.config
    chain = Chain(config.pipelines, base_dir=config.base_dir)
    runner = MailboxRunner(
        config.mailboxes[0],
        config=config,
        chain=chain,
        journal=journal,
        quarantine=Quarantine(config.resolve("var/quarantine")),
        hooks=Hooks(app.pm),
    )
    return runner, chain


# --- the retry delay --------------------------------------------------------------


def test_lease_retry_delay_doubles_from_the_interval_up_to_half_the_ttl() -> None:
    rng = random.Random(7)
    delays = [
        lease_retry_delay(interval=0.1, ttl=4.0, misses=m, rng=rng) for m in range(1, 9)
    ]
    highs = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    for got, high in zip(delays, highs, strict=True):
        assert 0.8 * high <= got <= high
    # A poll interval longer than ttl/2 is never shortened.
    assert lease_retry_delay(interval=30.0, ttl=4.0, misses=5, rng=rng) >= 24.0
    # Bounded even after very many misses.
    assert lease_retry_delay(interval=0.1, ttl=4.0, misses=10**6, rng=rng) <= 2.0


# --- (3) renewals come well within the ttl ------------------------------------------


async def test_a_poll_lasting_several_ttls_keeps_its_lease(
    tmp_path: Path, pg_url: str
) -> None:
    """ttl 0.6 s, a RETR answered after 2 s: renewed every 0.2 s, nobody can take the
    mailbox meanwhile, and the poll commits (QUIT) normally."""
    faults = Faults(stall_on={"RETR"}, stall_seconds=2.0)
    with Pop3Server([msg(1)], tls="implicit", faults=[faults]) as srv:
        app = write_config(tmp_path, srv, pg_url, ttl=0.6)
        journal = PostgresJournal.from_url(pg_url)
        rival = PostgresJournal.from_url(pg_url)
        try:
            sched = Scheduler(
                app.config, journal=journal, hooks=Hooks(app.pm), once=True, owner="w1"
            )
            task = asyncio.create_task(sched.run())
            stolen = 0
            tries = 0
            for _ in range(400):  # bounded: ~4 s at most
                if task.done():
                    break
                await asyncio.sleep(0.01)
                if srv.active_sessions:
                    tries += 1
                    if rival.lock_mailbox("box", owner="rival", ttl=60):
                        stolen += 1
                        rival.unlock_mailbox("box", owner="rival")
            summaries = await asyncio.wait_for(task, timeout=30)
            assert tries > 10  # the rival really tried during the session
            assert stolen == 0
            assert [s.error for s in summaries] == [None]
            assert summaries[0].deleted == 1
            assert srv.messages == []
            assert "QUIT" in commands(srv, 1)
            assert rival.lock_mailbox("box", owner="rival", ttl=60)  # released
        finally:
            rival.close()
            journal.close()


# --- (1) a lost lease stops the session before DELE and QUIT ------------------------


async def test_a_lease_lost_at_any_check_aborts_the_session_without_quit(
    tmp_path: Path, pg_url: str
) -> None:
    """Sweep: the worker stalls past its ttl at the k-th lease check and a rival takes
    the mailbox over. The session must end without QUIT (nothing deleted), keep what
    completed in the journal, and a later poll must finish the work with each
    message stored exactly once."""
    ttl = 0.4
    messages = [msg(n) for n in range(1, 4)]
    checks_in_full_poll: int | None = None
    for k in range(1, 20):  # bounded: a full poll makes far fewer checks
        case = tmp_path / f"k{k}"
        case.mkdir()
        url = pg_url.replace("?schema=", f"?schema=k{k}_")
        with Pop3Server(messages, tls="implicit") as srv:
            app = write_config(case, srv, url, ttl=ttl)
            journal = PostgresJournal.from_url(url)
            rival = PostgresJournal.from_url(url)
            runner, chain = make_runner(app, journal)
            await chain.open()
            try:
                lease = MailboxLease(journal, "box", owner="w1", ttl=ttl)
                assert lease.acquire()
                calls = 0

                def stalling_check(
                    lease: MailboxLease = lease,
                    rival: PostgresJournal = rival,
                    k: int = k,
                ) -> None:
                    nonlocal calls
                    calls += 1
                    if calls == k:
                        time.sleep(ttl * 1.5)  # a blocked worker: the lease expires
                        assert rival.lock_mailbox("box", owner="rival", ttl=60)
                    lease.check()

                runner.lease_check = stalling_check
                summary = await runner.poll()
                if calls < k:  # the poll made fewer than k checks: sweep complete
                    checks_in_full_poll = calls
                    assert summary.error is None
                    break
                assert summary.error_type == "LeaseLostError", summary
                assert isinstance(runner.last_exception, LeaseLostError)
                assert lease.lost
                # The session the loss hit (the only one: the fake server lists
                # everything, so no T-44 follow-up session) ends without QUIT.
                assert srv.transcript.sessions == 1
                cmds = commands(srv, 1)
                assert "QUIT" not in cmds, cmds
                assert len(srv.messages) == 3  # no QUIT: the server deleted nothing
                # What completed before the loss is journaled; none of it is re-run.
                done = {
                    e.uid
                    for e in journal.list("box")
                    if e.status == Status.COMMITTED and e.delete_due
                }
                assert len(done) == len(set(stored_keys(case)))

                # The rival releases; a healthy poll finishes the work.
                rival.unlock_mailbox("box", owner="rival")
                lease2 = MailboxLease(journal, "box", owner="w1", ttl=30)
                assert lease2.acquire()
                runner.lease_check = lease2.check
                summary2 = await runner.poll()
                lease2.release()
                assert summary2.error is None, summary2
                assert srv.messages == []
                keys = stored_keys(case)
                assert len(keys) == 3 and len(set(keys)) == 3, (k, keys)
                assert summary2.processed == 3 - len(done)
            finally:
                await chain.close()
                rival.close()
                journal.close()
                import psycopg

                with psycopg.connect(PG_DSN, autocommit=True) as conn:
                    schema = url.rsplit("schema=", 1)[1]
                    conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    # retrieve + 3 messages + DELE + QUIT at least: every one of them was swept.
    assert checks_in_full_poll is not None and checks_in_full_poll >= 6


async def test_a_late_renewal_is_made_up_before_quit_when_nobody_took_over(
    tmp_path: Path, pg_url: str
) -> None:
    """A stall past the ttl with no rival: the check renews on the spot (the lease row
    still names this worker, so nobody polled meanwhile) and the poll commits."""
    ttl = 0.4
    with Pop3Server([msg(1), msg(2)], tls="implicit") as srv:
        app = write_config(tmp_path, srv, pg_url, ttl=ttl)
        journal = counting_journal(pg_url)
        runner, chain = make_runner(app, journal)
        await chain.open()
        try:
            lease = MailboxLease(journal, "box", owner="w1", ttl=ttl)
            assert lease.acquire()
            renewed_at_quit: list[float] = []
            ack_checks: list[None] = []

            def ack_check() -> None:
                # Called before the DELEs (queued, P-13) and before QUIT: the second
                # call is the one between them. (Before MP-06's change this test
                # stalled in a T-44 follow-up session, which the fake no longer gets.)
                ack_checks.append(None)
                if len(ack_checks) == 2:
                    time.sleep(ttl * 1.5)  # stalled between DELE and QUIT
                    lease.check()
                    renewed_at_quit.append(lease.remaining())
                    return
                lease.check()

            runner.lease_check = lease.check
            runner.ack_check = ack_check
            summary = await runner.poll()
            lease.release()
            assert summary.error is None, summary
            assert renewed_at_quit and renewed_at_quit[0] > ttl / 3
            assert srv.messages == []
            assert "QUIT" in commands(srv, 1)
        finally:
            await chain.close()
            journal.close()


# --- (2) a lease held elsewhere: bounded, growing retries ---------------------------


async def test_a_worker_without_the_lease_backs_off_instead_of_spinning(
    tmp_path: Path, pg_url: str
) -> None:
    """Another worker holds the mailbox for 2 s; with poll_interval 0.05 s the old
    scheduler retried ~40 times. Now the retries double up to ttl/2, and the mailbox
    is polled soon after the holder lets go."""
    interval, ttl, hold = 0.05, 2.0, 2.0
    with Pop3Server([msg(1)], tls="implicit") as srv:
        app = write_config(tmp_path, srv, pg_url, ttl=ttl, poll_interval=interval)
        journal = counting_journal(pg_url)
        holder = PostgresJournal.from_url(pg_url)
        try:
            assert holder.lock_mailbox("box", owner="holder", ttl=60)
            held_from = time.monotonic()
            sched = Scheduler(
                app.config, journal=journal, hooks=Hooks(app.pm), owner="w1"
            )
            task = asyncio.create_task(sched.run())
            await asyncio.sleep(hold)
            holder.unlock_mailbox("box", owner="holder")
            released = time.monotonic()
            for _ in range(1000):  # bounded: 10 s
                if srv.messages == [] and not srv.active_sessions:
                    break
                await asyncio.sleep(0.01)
            sched.request_stop()
            await asyncio.wait_for(task, timeout=30)

            misses = [t for t, took in journal.attempts if t < released and not took]
            # Delays never run short, so at most this many retries fit in the hold.
            budget, fit = released - held_from, 0
            for m in range(1, 1000):
                budget -= 0.8 * min(max(interval, ttl / 2), interval * 2 ** (m - 1))
                if budget < 0:
                    break
                fit += 1
            assert 1 <= len(misses) <= fit + 2, (len(misses), fit)
            assert len(misses) < hold / interval / 3  # far from one per interval
            assert any(took for _, took in journal.attempts)
            assert srv.messages == [] and len(stored_keys(tmp_path)) == 1
        finally:
            holder.close()
            journal.close()


async def test_a_dead_workers_mailbox_is_taken_over_once_its_lease_expires(
    tmp_path: Path, pg_url: str
) -> None:
    """A worker took the lease and died (never renewed, never released): the mailbox
    is not polled before the lease expires, and is polled after."""
    ttl = 1.5
    with Pop3Server([msg(1), msg(2)], tls="implicit") as srv:
        app = write_config(tmp_path, srv, pg_url, ttl=ttl)
        journal = counting_journal(pg_url)
        schema = pg_url.rsplit("schema=", 1)[1]
        try:
            import psycopg

            before = time.monotonic()
            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                # Exactly the row a worker's lock_mailbox leaves behind.
                conn.execute(
                    f"INSERT INTO {schema}.mailpipe_leases VALUES ('box', "
                    "'dead-worker', clock_timestamp() + make_interval(secs => %s))",
                    (ttl,),
                )
            sched = Scheduler(
                app.config, journal=journal, hooks=Hooks(app.pm), owner="w1"
            )
            task = asyncio.create_task(sched.run())
            for _ in range(2000):  # bounded: 20 s
                if srv.messages == [] and not srv.active_sessions:
                    break
                await asyncio.sleep(0.01)
            sched.request_stop()
            await asyncio.wait_for(task, timeout=30)
            taken = [t for t, took in journal.attempts if took]
            assert taken, journal.attempts
            assert taken[0] >= before + ttl - 0.05  # never while the lease was live
            assert srv.messages == []
            assert sorted(stored_keys(tmp_path)) == sorted(set(stored_keys(tmp_path)))
            assert len(stored_keys(tmp_path)) == 2
        finally:
            journal.close()


async def test_a_journal_error_while_locking_is_retried_not_fatal(
    tmp_path: Path, pg_url: str
) -> None:
    """The lease connection is killed server-side (a PostgreSQL restart): the lock
    attempt fails, the scheduler keeps running and polls on the next attempt."""
    with Pop3Server([msg(1)], tls="implicit") as srv:
        app = write_config(tmp_path, srv, pg_url, ttl=5.0)
        journal = counting_journal(pg_url)
        try:
            kill_backend(journal._lease_connection().info.backend_pid)
            sched = Scheduler(
                app.config, journal=journal, hooks=Hooks(app.pm), owner="w1"
            )
            task = asyncio.create_task(sched.run())
            for _ in range(1000):  # bounded: 10 s
                if srv.messages == [] and not srv.active_sessions:
                    break
                await asyncio.sleep(0.01)
            sched.request_stop()
            await asyncio.wait_for(task, timeout=30)
            outcomes = [took for _, took in journal.attempts]
            assert outcomes[0] is None and True in outcomes, outcomes
            assert srv.messages == []
            assert len(stored_keys(tmp_path)) == 1
        finally:
            journal.close()


def test_lease_check_raises_once_the_deadline_passes_without_renewal(
    pg_url: str,
) -> None:
    """The journal unreachable while renewing: the lease counts as lost once less than
    ttl/3 is surely left, so nothing is DELE'd on a lease that may have expired."""
    now = [100.0]
    journal = counting_journal(pg_url)
    try:
        lease = MailboxLease(journal, "box", owner="w1", ttl=3.0, clock=lambda: now[0])
        assert lease.acquire()
        lease.check()  # fresh
        journal.renew_down = True
        now[0] += 1.5  # renewal overdue, journal down: still 1.5 s > ttl/3 left
        lease.check()
        assert not lease.lost
        now[0] += 1.0  # 0.5 s left < ttl/3
        with pytest.raises(LeaseLostError):
            lease.check()
        assert lease.lost
    finally:
        journal.close()
