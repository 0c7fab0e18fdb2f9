"""mailpipe.leases: renewal apart from message time, fencing by lease epoch (issue 16).

Runs the real scheduler/engine against the real PostgreSQL journal (skipped without
it, failing under CI) and the fence checks against both journals.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mailpipe.app import App, open_app
from mailpipe.chain import Chain
from mailpipe.engine import MailboxRunner
from mailpipe.journal import FencedError, JournalError
from mailpipe.journal.base import Status
from mailpipe.journal.postgres import PostgresJournal
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.leases import LeaseLostError, MailboxLease
from mailpipe.plugin_manager import Hooks
from mailpipe.quarantine import Quarantine
from mailpipe.scheduler import Scheduler
from mailpipe.testing.server import Pop3Server

pytestmark = [pytest.mark.timeout(120)]

MESSAGE = (
    b"From: a@example.com\r\nTo: b@example.com\r\nMessage-ID: <slow@example.com>\r\n"
    b"Subject: slow\r\n\r\nbody\r\n"
)


def write_config(tmp_path: Path, srv: Pop3Server, url: str, *, ttl: float,
                 step_seconds: float) -> App:
    cfg = tmp_path / "pipeline.toml"
    script = f"cat >/dev/null; sleep {step_seconds}"
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
poll_interval = 0.05
jitter = 0.0
[pipelines.default]
processors = [
  {{ use = "forward.command", timeout = "60s", command = ["sh", "-c", "{script}"] }},
  {{ use = "store.jsonl", path = "var/out.jsonl" }},
]
"""
    )
    return open_app(cfg)


class RenewCounting(PostgresJournal):
    """The real journal, counting renewals; ``renew_down`` makes them fail."""

    renewals = 0
    renew_down = False

    def renew_mailbox(self, mailbox: str, *, owner: str, ttl: float) -> bool:
        if self.renew_down:
            raise JournalError("PostgreSQL journal: server closed the connection")
        self.renewals += 1
        return super().renew_mailbox(mailbox, owner=owner, ttl=ttl)


def open_counting(url: str) -> RenewCounting:
    journal = RenewCounting.from_url(url)
    assert isinstance(journal, RenewCounting)
    return journal


@pytest.mark.services
async def test_renewal_keeps_the_lease_through_a_step_of_three_ttls(
    tmp_path: Path, pg_schema_url: str
) -> None:
    """Issue 16.3: a step sleeping 3 x lease_ttl; the lease is renewed meanwhile (by
    its own task, not by message progress), so a rival never gets the mailbox and the
    poll commits and DELEs normally."""
    ttl = 0.6
    with Pop3Server([MESSAGE], tls="implicit") as srv:
        app = write_config(tmp_path, srv, pg_schema_url, ttl=ttl,
                           step_seconds=3 * ttl)
        journal = open_counting(pg_schema_url)
        rival = PostgresJournal.from_url(pg_schema_url)
        try:
            sched = Scheduler(app.config, journal=journal, hooks=Hooks(app.pm),
                              once=True, owner="w1")
            task = asyncio.create_task(sched.run())
            tries = stolen = 0
            for _ in range(3000):  # bounded; ends with the poll
                if task.done():
                    break
                await asyncio.sleep(0.01)
                if srv.active_sessions:
                    tries += 1
                    stolen += rival.lock_mailbox("box", owner="rival", ttl=60)
            await asyncio.wait_for(task, timeout=60)
            (summary,) = sched.summaries
            assert summary.error is None, summary
            assert stolen == 0 and tries > 0
            assert journal.renewals >= 3  # the step took 3 ttl: renewed every ttl/3
            assert srv.messages == []
            lines = (tmp_path / "var" / "out.jsonl").read_text().splitlines()
            assert len(lines) == 1
        finally:
            rival.close()
            journal.close()


@pytest.mark.services
async def test_a_step_that_outlives_its_lease_is_abandoned_not_committed(
    tmp_path: Path, pg_schema_url: str
) -> None:
    """Issue 16.2-3: renewals fail during a slow step, the lease expires and a rival
    takes the mailbox over; when the step returns, its work is neither committed (the
    fenced batch is refused) nor acknowledged (no DELE, no QUIT), and the log says so."""
    ttl = 0.4
    with Pop3Server([MESSAGE], tls="implicit") as srv:
        app = write_config(tmp_path, srv, pg_schema_url, ttl=ttl, step_seconds=2.0)
        journal = open_counting(pg_schema_url)
        rival = PostgresJournal.from_url(pg_schema_url)
        config = app.config
        chain = Chain(config.pipelines, base_dir=config.base_dir)
        runner = MailboxRunner(
            config.mailboxes[0], config=config, chain=chain, journal=journal,
            quarantine=Quarantine(config.resolve("var/quarantine")),
            hooks=Hooks(app.pm),
        )
        await chain.open()
        try:
            lease = MailboxLease(journal, "box", owner="w1", ttl=ttl)
            assert lease.acquire() and lease.fence is not None
            runner.lease_check, runner.ack_check = lease.check, lease.check_fence
            runner.fence = lease.fence
            stop_renewing = lease.renew_periodically()
            with capture_logs() as logs:
                poll = asyncio.create_task(runner.poll())
                taken = False
                for _ in range(2000):  # bounded
                    await asyncio.sleep(0.01)
                    if srv.active_sessions and not journal.renew_down:
                        journal.renew_down = True  # partitioned from the journal
                    if journal.renew_down and not taken:
                        taken = rival.lock_mailbox("box", owner="rival", ttl=60)
                    if poll.done():
                        break
                summary = await poll
            stop_renewing()
            assert taken
            assert summary.error_type in ("FencedError", "LeaseLostError"), summary
            assert isinstance(runner.last_exception, FencedError | LeaseLostError)
            assert len(srv.messages) == 1  # no DELE/QUIT: the server keeps it
            entries = rival.get_many("box", [e.uid for e in rival.list("box")])
            assert all(e.status is Status.PENDING for e in entries.values()), entries
            events = {e["event"] for e in logs}
            abandoned = {"journal_batch_fenced", "mailbox_lease_expired",
                         "mailbox_lease_lost", "mailbox_lease_fenced"}
            assert events & abandoned, events
        finally:
            await chain.close()
            rival.close()
            journal.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_check_fence_refuses_an_acknowledgement_after_a_take_over(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """The acknowledgement check asks the journal, not only the local deadline: with
    the local clock saying the lease is fresh, a take-over still stops the DELE."""
    if kind == "sqlite":
        one = SqliteJournal(tmp_path / "j.sqlite3")
        two = SqliteJournal(tmp_path / "j.sqlite3")
    else:
        request.applymarker(pytest.mark.services)
        url = request.getfixturevalue("pg_schema_url")
        one, two = PostgresJournal.from_url(url), PostgresJournal.from_url(url)
    try:
        frozen = [0.0]
        lease = MailboxLease(one, "box", owner="w1", ttl=30, clock=lambda: frozen[0])
        assert lease.acquire()
        lease.check_fence()  # held: passes
        # Taken over behind this worker's back (its flock released / row expired).
        one.unlock_mailbox("box", owner="w1")
        if kind == "sqlite":
            one._locks["box"] = ("w1", None)  # this worker still believes it holds it
        assert two.lock_mailbox("box", owner="w2", ttl=30)
        lease.check()  # the local deadline alone sees nothing wrong
        with capture_logs() as logs, pytest.raises(LeaseLostError, match="taken over"):
            lease.check_fence()
        assert [e["event"] for e in logs] == ["mailbox_lease_fenced"]
        assert lease.lost
    finally:
        two.close()
        one.close()


class _CountingJournal:
    """Just the lease calls: counts renewals; ``held`` says what they answer."""

    def __init__(self) -> None:
        self.renewals = 0
        self.held = True

    def renew_mailbox(self, mailbox: str, *, owner: str, ttl: float) -> bool:
        self.renewals += 1
        return self.held


async def test_periodic_renewal_runs_until_stopped_or_lost() -> None:
    """The timer of :meth:`MailboxLease.renew_periodically` (issue 18: no task per
    poll) renews again and again, stops when told, and stops on its own once the
    lease is lost."""
    journal = _CountingJournal()
    lease = MailboxLease(journal, "box", owner="w1", ttl=0.03)  # type: ignore[arg-type]
    stop = lease.renew_periodically()
    for _ in range(1000):  # bounded
        if journal.renewals >= 3:
            break
        await asyncio.sleep(0.01)
    stop()
    seen = journal.renewals
    assert seen >= 3
    for _ in range(5):
        await asyncio.sleep(0.01)
    assert journal.renewals == seen  # stopped

    journal.held = False
    stop = lease.renew_periodically()
    for _ in range(1000):  # bounded
        if lease.lost:
            break
        await asyncio.sleep(0.01)
    assert lease.lost
    lost_at = journal.renewals
    for _ in range(5):
        await asyncio.sleep(0.01)
    assert journal.renewals == lost_at  # no renewal after the loss
    stop()  # harmless after the loss


def test_a_lease_whose_fence_cannot_be_read_is_given_back(tmp_path: Path) -> None:
    # Review of MP-07: the lock taken, the fence's query failing: the error propagates
    # (the scheduler counts a miss) and the lease is released, not held for its ttl
    # while every worker passes the mailbox over.
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    other = SqliteJournal(tmp_path / "j.sqlite3")
    try:
        def broken(mailbox: str, *, owner: str) -> None:
            raise JournalError("the fence could not be read")

        journal.fence = broken  # type: ignore[method-assign]
        lease = MailboxLease(journal, "box", owner="w1", ttl=300)
        with pytest.raises(JournalError, match="fence"):
            lease.acquire()
        assert other.lock_mailbox("box", owner="w2", ttl=300)  # free at once
    finally:
        other.close()
        journal.close()
