"""Scheduler back-off rules and concurrency, without wall-clock assertions."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict
from structlog.testing import capture_logs

from mailpipe.config import SchedulerConfig
from mailpipe.errors import (
    AuthenticationError,
    SourceBusyError,
    SourceConnectionError,
    SourcePermanentError,
)
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.plugin_manager import Hooks, get_plugin_manager
from mailpipe.registry import Registry
from mailpipe.scheduler import Scheduler, next_delay
from mailpipe.source import facts_of
from mailpipe.testing.fakes import FakeSource
from mailpipe.validation import validate_config

SCHED = SchedulerConfig(backoff_initial=5, backoff_max=100, backoff_auth=3600)


def delay(error: BaseException | None, failures: int = 1) -> float:
    return next_delay(
        SCHED,
        interval=60,
        jitter=0.1,
        failures=failures,
        error=error,
        rng=random.Random(1),
    )


def test_success_waits_interval_with_jitter() -> None:
    values = {
        next_delay(
            SCHED, interval=60, jitter=0.1, failures=0, error=None, rng=random.Random(i)
        )
        for i in range(20)
    }
    assert all(54 <= v <= 66 for v in values) and len(values) > 1


def test_exponential_backoff_is_capped() -> None:
    err = SourceConnectionError("refused")
    seq = [delay(err, n) for n in range(1, 10)]
    assert seq[0] <= 5 and seq[1] > seq[0] and seq[2] > seq[1]
    assert max(seq) <= 100


@pytest.mark.parametrize(
    "err", [AuthenticationError("no"), SourcePermanentError("x", code="SYS/PERM")]
)
def test_auth_and_permanent_failures_stop_hammering(err: BaseException) -> None:
    # S-14: stop on [AUTH]; at most one retry per hour.
    assert delay(err) == 3600


def test_login_delay_is_honoured() -> None:
    # S-14: LOGIN-DELAY honoured.
    err = SourceBusyError("later", code="LOGIN-DELAY", retry_after=900)
    assert delay(err) == 900
    assert delay(SourceBusyError("in use", code="IN-USE")) <= 5


def _config(tmp_path: Path, n: int, concurrency: int):  # type: ignore[no-untyped-def]
    registry = Registry()
    registry.add("source", FakeSource, "test")
    data = {
        "scheduler": {"concurrency": concurrency},
        "mailboxes": [{"name": f"m{i}", "source": "fake"} for i in range(n)],
        "pipelines": {"default": {"processors": []}},
    }
    return validate_config(data, path=tmp_path / "p.toml", registry=registry)


async def _run_polling_with(
    scheduler: Scheduler, journal: SqliteJournal, poll: Any
) -> list[Any]:
    """Run ``scheduler`` with ``MailboxRunner.poll`` replaced by ``poll`` (a wrapper
    that holds the original), restore it, close ``journal``; the summaries."""
    from mailpipe.engine import MailboxRunner

    original = MailboxRunner.poll
    MailboxRunner.poll = poll  # type: ignore[method-assign]
    try:
        return await asyncio.wait_for(scheduler.run(), 30)
    finally:
        MailboxRunner.poll = original  # type: ignore[method-assign]
        journal.close()


async def test_once_polls_every_mailbox_under_the_concurrency_limit(
    tmp_path: Path,
) -> None:
    FakeSource.boxes.clear()
    config = _config(tmp_path, 6, concurrency=2)
    for i in range(6):
        FakeSource.boxes.setdefault(
            f"m{i}",
            __import__(
                "mailpipe.testing.fakes", fromlist=["FakeMailbox"]
            ).FakeMailbox(),
        ).add("u", b"Subject: x\r\n\r\nx\r\n")
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    scheduler = Scheduler(
        config,
        journal=journal,
        hooks=Hooks(get_plugin_manager(entry_points=False)),
        once=True,
    )
    active = 0
    peak = 0
    from mailpipe.engine import MailboxRunner

    original = MailboxRunner.poll

    async def counting(self: MailboxRunner):  # type: ignore[no-untyped-def]
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        try:
            return await original(self)
        finally:
            active -= 1

    summaries = await _run_polling_with(scheduler, journal, counting)
    assert sorted(s.mailbox for s in summaries) == [f"m{i}" for i in range(6)]
    assert all(s.deleted == 1 for s in summaries)
    assert peak == 2


async def test_stop_ends_run_forever(tmp_path: Path) -> None:
    FakeSource.boxes.clear()
    config = _config(tmp_path, 2, concurrency=4)
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    scheduler = Scheduler(
        config, journal=journal, hooks=Hooks(get_plugin_manager(entry_points=False))
    )
    task = asyncio.create_task(scheduler.run())
    for _ in range(200):
        if len(scheduler.summaries) >= 2:
            break
        await asyncio.sleep(0.01)
    scheduler.request_stop()
    summaries = await asyncio.wait_for(task, 10)
    journal.close()
    assert len(summaries) >= 2 and task.done()


class _PushFake(FakeSource):
    """A push-capable fake whose wait_for_mail answers at once with ``answer``."""

    answer = False
    waits = 0

    @contextlib.asynccontextmanager
    async def session(self):  # type: ignore[no-untyped-def,override]
        async with super().session() as opened:
            opened.facts = dataclasses.replace(facts_of(opened), can_push=True)
            yield opened

    async def wait_for_mail(self, timeout: float) -> bool:
        type(self).waits += 1
        await asyncio.sleep(0)
        return self.answer


class Closing(_PushFake):
    """A push fake that counts its close() calls (its kept connections closed)."""

    closed = 0

    async def close(self) -> None:
        type(self).closed += 1


async def _run_for(
    tmp_path: Path, source: type, seconds: float, *,
    data: dict[str, Any] | None = None, until: Callable[[], bool] | None = None,
) -> list[Any]:
    """Run a scheduler over ``data`` (default: one mailbox of ``source``,
    poll_interval 60 s) for ``seconds`` (with ``until``: until it holds, checked
    every 10 ms, for at most ``seconds``), then stop it; return its poll summaries."""
    registry = Registry()
    registry.add("source", source, "test")
    config = validate_config(
        data or {"mailboxes": [{"name": "p", "source": "fake", "poll_interval": 60}],
                 "pipelines": {"default": {"processors": []}}},
        path=tmp_path / "p.toml", registry=registry,
    )
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    scheduler = Scheduler(
        config, journal=journal, hooks=Hooks(get_plugin_manager(entry_points=False))
    )
    task = asyncio.create_task(scheduler.run())
    if until is None:
        await asyncio.sleep(seconds)
    else:
        for _ in range(int(seconds * 100)):  # bounded
            if until():
                break
            await asyncio.sleep(0.01)
    scheduler.request_stop()
    try:
        return list(await asyncio.wait_for(task, 10))
    finally:
        journal.close()


@pytest.mark.parametrize("answer", [False, True])
async def test_a_push_source_that_answers_at_once_cannot_spin(
    tmp_path: Path, answer: bool
) -> None:
    # A wait_for_mail that returns early without mail (False), or that claims new mail
    # every time (True) while nothing new arrives, must not turn a 60 s poll interval
    # into a tight loop: the timer decides the next poll.
    FakeSource.boxes.clear()
    _PushFake.answer, _PushFake.waits = answer, 0
    # a spinning scheduler polls thousands of times in 0.5 s
    summaries = await _run_for(tmp_path, _PushFake, 0.5)
    # False: one poll, then the interval. True: one wake-up poll that found nothing,
    # then the interval.
    assert len(summaries) == (2 if answer else 1)
    assert _PushFake.waits == 1


async def test_a_push_source_waits_only_while_its_sessions_can_push(tmp_path: Path) -> None:
    # SessionFacts.can_push is what enables the push wait (IMAP: always, IDLE or STATUS polling).
    FakeSource.boxes.clear()

    class NoPush(_PushFake):
        @contextlib.asynccontextmanager
        async def session(self):  # type: ignore[no-untyped-def,override]
            async with FakeSource.session(self) as opened:
                yield opened  # facts: can_push False

    NoPush.answer, NoPush.waits = True, 0
    summaries = await _run_for(tmp_path, NoPush, 0.3)
    assert len(summaries) == 1 and NoPush.waits == 0


async def test_the_scheduler_closes_a_source_that_keeps_connections(
    tmp_path: Path,
) -> None:
    # IMAP push keeps its IDLE connections between waits (IC-43): the scheduler closes
    # the source (LOGOUT) once, when it stops.
    FakeSource.boxes.clear()

    Closing.answer, Closing.waits, Closing.closed = False, 0, 0
    await _run_for(tmp_path, Closing, 0.2)
    assert Closing.closed == 1


class _Hung:
    """A closable source whose close() hangs (a server that never answers LOGOUT)."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def close(self) -> None:
        self.started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def test_close_sources_closes_all_at_once_within_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Shutdown against hung servers must not grow with the number of mailboxes: every
    # source starts closing at once and those still hanging after the bound are cancelled.
    from types import SimpleNamespace

    from mailpipe import scheduler
    from mailpipe.scheduler import close_sources

    monkeypatch.setattr(scheduler, "CLOSE_TIMEOUT", 0.05, raising=False)
    hung = [_Hung() for _ in range(3)]
    runners = [SimpleNamespace(name=f"m{i}", source=h) for i, h in enumerate(hung)]
    before = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    await asyncio.wait_for(close_sources(runners), 30)  # type: ignore[arg-type]
    assert [h.started for h in hung] == [1, 1, 1]
    assert [h.cancelled for h in hung] == [1, 1, 1]
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == before


async def test_a_mailbox_leased_elsewhere_has_its_source_closed(tmp_path: Path) -> None:
    # IC-44: a worker keeps no push connections for a mailbox another worker holds
    # (they count against the server's per-user connection limit).
    from mailpipe.leases import MailboxLease

    FakeSource.boxes.clear()

    Closing.answer, Closing.waits, Closing.closed = False, 0, 0
    registry = Registry()
    registry.add("source", Closing, "test")
    config = validate_config(
        {"mailboxes": [{"name": "p", "source": "fake", "poll_interval": 60}],
         "pipelines": {"default": {"processors": []}}},
        path=tmp_path / "p.toml", registry=registry,
    )
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    other = MailboxLease(journal, "p", owner="other-worker", ttl=600)
    assert other.acquire()
    scheduler = Scheduler(
        config, journal=journal, hooks=Hooks(get_plugin_manager(entry_points=False))
    )
    task = asyncio.create_task(scheduler.run())
    try:
        for _ in range(3000):  # bounded
            if Closing.closed or task.done():
                break
            await asyncio.sleep(0.01)
        assert Closing.closed >= 1 and not task.done()  # closed while still running
        assert scheduler.summaries == []  # never polled here
    finally:
        scheduler.request_stop()
        await asyncio.wait_for(task, 10)
        journal.close()


async def _once(tmp_path: Path, n: int, concurrency: int) -> tuple[list[Any], SqliteJournal]:
    config = _config(tmp_path, n, concurrency=concurrency)
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    scheduler = Scheduler(
        config, journal=journal, hooks=Hooks(get_plugin_manager(entry_points=False)),
        once=True,
    )
    return list(await asyncio.wait_for(scheduler.run(), 60)), journal


async def test_poll_records_of_many_mailboxes_share_journal_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: a cycle with no new mail makes no journal commit per mailbox for its
    poll records; every record is still written, each inside a batch."""
    FakeSource.boxes.clear()
    batches = 0
    seen: list[int] = []  # the batch each record was written in (0: none)
    original_batch = SqliteJournal.batch
    original_record = SqliteJournal.record_poll

    @contextlib.contextmanager
    def counting_batch(self: SqliteJournal, **kw: Any):  # type: ignore[no-untyped-def]
        nonlocal batches
        batches += 1
        mine = batches
        with original_batch(self, **kw):
            current.append(mine)
            try:
                yield
            finally:
                current.pop()

    current: list[int] = []

    def recording(self: SqliteJournal, mailbox: str, **kw: Any) -> None:
        seen.append(current[-1] if current else 0)
        original_record(self, mailbox, **kw)

    monkeypatch.setattr(SqliteJournal, "batch", counting_batch)
    monkeypatch.setattr(SqliteJournal, "record_poll", recording)
    summaries, journal = await _once(tmp_path, 250, concurrency=50)
    try:
        polls = journal.polls()
    finally:
        journal.close()
    assert len(summaries) == 250 and all(not s.error for s in summaries)
    assert sorted(polls) == sorted(f"m{i}" for i in range(250))
    assert all(p.last_success is not None for p in polls.values())
    assert len(seen) == 250 and 0 not in seen  # each record inside a batch
    assert len(set(seen)) <= 25  # ...of at least ten records on average


async def test_a_poll_with_no_new_mail_writes_no_inflight_marker(tmp_path: Path) -> None:
    """The in-flight marker file is made when a message enters the chain, not by a
    poll that finds nothing (issue 18); crash accounting is unchanged (test_inflight)."""
    from mailpipe.testing.fakes import FakeMailbox

    FakeSource.boxes.clear()
    FakeSource.boxes["m1"] = FakeMailbox()
    FakeSource.boxes["m1"].add("u", b"Subject: x\r\n\r\nx\r\n")
    summaries, journal = await _once(tmp_path, 2, concurrency=2)
    journal.close()
    assert sorted((s.mailbox, s.retrieved) for s in summaries) == [("m0", 0), ("m1", 1)]
    markers = sorted((tmp_path / "var" / "spool").glob(".inflight-*"))
    assert len(markers) == 1  # m1's only: its message ran through the chain


class _HostOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str


class _HostSource(FakeSource):
    """The fake source with a ``host`` option, as POP3 and IMAP have."""

    Options = _HostOptions


async def test_each_server_gets_at_most_host_concurrency_polls_at_a_time(
    tmp_path: Path,
) -> None:
    """Issue 18: ``host_concurrency`` caps the polls of one server (host names compared
    in lower case) below the global ``concurrency``; mailboxes waiting for a busy
    server hold no global slot, so another server's mailboxes poll meanwhile."""
    from mailpipe.engine import MailboxRunner
    from mailpipe.testing.fakes import FakeMailbox

    FakeSource.boxes.clear()
    registry = Registry()
    registry.add("source", _HostSource, "test")
    hosts = ["pop.a.example", "POP.A.example"] * 3 + ["pop.b.example"] * 2
    data = {
        "scheduler": {"concurrency": 3, "host_concurrency": 2},
        "mailboxes": [
            {"name": f"m{i}", "source": "fake", "host": host}
            for i, host in enumerate(hosts)
        ],
        "pipelines": {"default": {"processors": []}},
    }
    config = validate_config(data, path=tmp_path / "p.toml", registry=registry)
    for i in range(len(hosts)):
        FakeSource.boxes.setdefault(f"m{i}", FakeMailbox())
    active: dict[str, int] = {}
    peaks: dict[str, int] = {}
    original = MailboxRunner.poll

    async def counting(self: MailboxRunner):  # type: ignore[no-untyped-def]
        host = hosts[int(self.name[1:])].lower()
        for key in (host, "all"):
            active[key] = active.get(key, 0) + 1
            peaks[key] = max(peaks.get(key, 0), active[key])
        await asyncio.sleep(0.01)
        try:
            return await original(self)
        finally:
            for key in (host, "all"):
                active[key] -= 1

    journal = SqliteJournal(tmp_path / "j.sqlite3")
    scheduler = Scheduler(
        config, journal=journal, hooks=Hooks(get_plugin_manager(entry_points=False)),
        once=True,
    )
    summaries = await _run_polling_with(scheduler, journal, counting)
    assert sorted(s.mailbox for s in summaries) == sorted(f"m{i}" for i in range(8))
    # Server A never had more than 2; the third global slot went to server B.
    assert peaks["pop.a.example"] == 2 and peaks["pop.b.example"] <= 2
    assert peaks["all"] == 3


class _HostPush(_PushFake):
    """A push source with a ``host``, whose wait between polls keeps its connections
    (an IMAP push pool) until the scheduler stops."""

    Options = _HostOptions
    waiting: ClassVar[set[str]] = set()

    async def wait_for_mail(self, timeout: float) -> bool:
        type(self).waiting.add(self.mailbox)
        await asyncio.sleep(timeout)  # cancelled when the scheduler stops
        return False


async def test_host_concurrency_counts_polls_not_the_connections_kept_between_them(
    tmp_path: Path,
) -> None:
    """Issue 18 review: the per-host slot is held for a poll only. A push mailbox
    watching its server between polls holds none, so with one slot both mailboxes
    of the server poll and then watch together (their kept connections are not
    counted; the option's documentation says so)."""
    FakeSource.boxes.clear()
    _HostPush.waiting = set()
    data = {
        "scheduler": {"host_concurrency": 1},
        "mailboxes": [{"name": f"m{i}", "source": "fake", "host": "imap.example",
                       "poll_interval": 60} for i in range(2)],
        "pipelines": {"default": {"processors": []}},
    }
    summaries = await _run_for(tmp_path, _HostPush, 10.0, data=data,
                               until=lambda: _HostPush.waiting == {"m0", "m1"})
    assert _HostPush.waiting == {"m0", "m1"}
    assert sorted(s.mailbox for s in summaries) == ["m0", "m1"]


def test_host_concurrency_documents_what_it_counts() -> None:
    """Issue 18 review: users set it to stay within a server's per-address connection
    limit, so its description says it counts polls and what it leaves out."""
    text = SchedulerConfig.model_fields["host_concurrency"].description or ""
    assert "Polls of one server" in text
    assert "Not counted" in text and "idle_connections" in text
    assert "other workers' polls" in text


def test_the_default_concurrency_is_64_in_all_and_32_per_server() -> None:
    """Issue 18: polls are mostly network waits; 4 at a time made a cycle over 1,000
    mailboxes take a minute at 20 ms round trips, where 32 on one server leave it
    CPU-bound (bench/RESULTS.md)."""
    sched = SchedulerConfig()
    assert (sched.concurrency, sched.host_concurrency) == (64, 32)


def test_a_bad_host_concurrency_names_key_value_and_what_is_accepted(
    tmp_path: Path,
) -> None:
    from mailpipe.errors import ConfigError

    registry = Registry()
    registry.add("source", FakeSource, "test")
    data = {
        "scheduler": {"host_concurrency": 0},
        "mailboxes": [{"name": "m", "source": "fake"}],
        "pipelines": {"default": {"processors": []}},
    }
    with pytest.raises(ConfigError) as caught:
        validate_config(data, path=tmp_path / "p.toml", registry=registry)
    assert (
        "scheduler.host_concurrency: Input should be greater than or equal to 1 "
        "(got 0)" in str(caught.value)
    )


def _two_mailboxes(tmp_path: Path) -> dict[str, Any]:
    return {
        "mailboxes": [
            {"name": name, "source": "fake", "poll_interval": 0.01, "jitter": 0}
            for name in ("bad", "good")
        ],
        "scheduler": {"backoff_initial": 0.01, "backoff_max": 0.02},
        "pipelines": {"default": {"processors": []}},
    }


def _poll_failing_for(
    monkeypatch: pytest.MonkeyPatch, mailbox: str, fail: Callable[[int], bool],
    message: str = "a defect around the poll",
) -> list[str]:
    """Make MailboxRunner.poll raise for ``mailbox`` on the calls (counted from 1)
    for which ``fail`` holds, as its code before its own error handling can (the
    spool dir's mkdir); return the list of mailboxes whose polls ran."""
    from mailpipe.engine import MailboxRunner

    original = MailboxRunner.poll
    polled: list[str] = []
    calls = 0

    async def poll(self: MailboxRunner) -> Any:
        nonlocal calls
        if self.name == mailbox:
            calls += 1
            if fail(calls):
                raise RuntimeError(message)
        summary = await original(self)
        polled.append(self.name)
        return summary

    monkeypatch.setattr(MailboxRunner, "poll", poll)
    return polled


async def test_mp07_an_exception_escaping_a_mailbox_loop_is_logged_and_backed_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MP-07: a defect in the scheduling around one mailbox's poll never ends the
    # worker: it is logged with its traceback, that mailbox backs off and starts
    # again, and every other mailbox goes on meanwhile.
    FakeSource.boxes.clear()
    taken = _poll_failing_for(monkeypatch, "bad", lambda call: call <= 2)
    with capture_logs() as logs:
        summaries = await _run_for(
            tmp_path, FakeSource, 10, data=_two_mailboxes(tmp_path),
            until=lambda: taken.count("bad") >= 1 and taken.count("good") >= 3,
        )
    failed = [e for e in logs if e["event"] == "mailbox_loop_failed"]
    assert [(e["mailbox"], e["failures"]) for e in failed] == [("bad", 1), ("bad", 2)]
    assert failed[0]["error"] == "RuntimeError: a defect around the poll"
    assert failed[0]["exc_info"] is True  # the traceback goes to the log
    assert taken.count("bad") >= 1  # its loop started again, and polled
    assert taken.count("good") >= 3
    assert {s.mailbox for s in summaries} == {"bad", "good"}


async def _run_once_over_two_mailboxes(
    tmp_path: Path,
) -> tuple[list[Any], dict[str, Any], list[dict[str, Any]]]:
    """``run --once``'s scheduler over "bad" and "good" (fake sources): its summaries,
    the journal's poll records and the log events."""
    registry = Registry()
    registry.add("source", FakeSource, "test")
    config = validate_config(_two_mailboxes(tmp_path), path=tmp_path / "p.toml",
                             registry=registry)
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    try:
        scheduler = Scheduler(config, journal=journal, once=True,
                              hooks=Hooks(get_plugin_manager(entry_points=False)))
        with capture_logs() as logs:
            summaries = await asyncio.wait_for(scheduler.run(), 10)
        return summaries, journal.polls(), logs
    finally:
        journal.close()


async def test_mp07_with_once_an_escaped_exception_is_that_mailboxs_failed_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeSource.boxes.clear()
    _poll_failing_for(monkeypatch, "bad", lambda call: call == 1)
    summaries, _, logs = await _run_once_over_two_mailboxes(tmp_path)
    by_name = {s.mailbox: s for s in summaries}
    assert by_name["bad"].error == "RuntimeError: a defect around the poll"
    assert by_name["bad"].committed is False
    assert by_name["good"].error is None
    assert [e["mailbox"] for e in logs if e["event"] == "mailbox_loop_failed"] == ["bad"]


async def test_mp07_with_once_the_escaped_exception_is_recorded_redacted_and_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Like a failed poll in once mode (_loop): one summary for the mailbox, its poll
    # record written (``mailpipe status``), its text redacted and storable as the
    # engine's error_text makes it.
    from mailpipe.secrets import forget_secrets, remember_secret

    FakeSource.boxes.clear()
    remember_secret("hunter2")
    try:
        _poll_failing_for(monkeypatch, "bad", lambda call: call == 1,
                          message="login hunter2 refused")
        summaries, polls, _ = await _run_once_over_two_mailboxes(tmp_path)
    finally:
        forget_secrets()
    assert [s.mailbox for s in summaries].count("bad") == 1
    (bad,) = [s for s in summaries if s.mailbox == "bad"]
    assert bad.error is not None and "hunter2" not in bad.error
    assert bad.error_type == "RuntimeError"
    assert "bad" in polls and polls["bad"].last_error_type == "RuntimeError"
    assert "hunter2" not in polls["bad"].last_error
    assert polls["bad"].next_poll is None  # no next poll after run --once


async def test_mp07_a_loop_backing_off_records_it_and_closes_its_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While the mailbox backs off after an escaped exception nothing watches its
    # source: its kept connections (IMAP push) are closed as for a lease held
    # elsewhere (IC-44), and ``mailpipe status`` shows the failure and the next poll.
    FakeSource.boxes.clear()

    Closing.answer, Closing.waits, Closing.closed = False, 0, 0
    _poll_failing_for(monkeypatch, "p", lambda call: call >= 2)
    registry = Registry()
    registry.add("source", Closing, "test")
    config = validate_config(
        {"mailboxes": [{"name": "p", "source": "fake", "poll_interval": 0.01,
                        "jitter": 0}],
         "scheduler": {"backoff_initial": 600, "backoff_max": 600},
         "pipelines": {"default": {"processors": []}}},
        path=tmp_path / "p.toml", registry=registry,
    )
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    scheduler = Scheduler(
        config, journal=journal, hooks=Hooks(get_plugin_manager(entry_points=False))
    )
    with capture_logs():
        task = asyncio.create_task(scheduler.run())
        try:
            for _ in range(1000):  # bounded
                last = scheduler.last.get("p")
                if task.done() or (last is not None and last.error is not None):
                    break
                await asyncio.sleep(0.01)
            assert not task.done()
            assert Closing.closed >= 1  # closed while backing off, not only at stop
            assert scheduler.last["p"].error_type == "RuntimeError"
            scheduler._flush_records()
            record = journal.polls()["p"]
            assert record.last_error_type == "RuntimeError"
            assert record.next_poll is not None
        finally:
            scheduler.request_stop()
            await asyncio.wait_for(task, 10)
            journal.close()
