"""Polls many mailboxes: intervals with jitter, a concurrency limit, leases, back-off.

Theory of operation
-------------------
One asyncio task per enabled mailbox. Each task loops: take a slot of its server's
semaphore (``host_concurrency`` per source host; sources without a host have none),
then one of the global ``concurrency`` semaphore, take the mailbox's lease in the
journal (an exclusive lock across processes and machines), poll, release both, then
sleep. A successful poll sleeps
``poll_interval`` spread by ``jitter``; a failed one sleeps per :func:`next_delay`, which
honours the server's LOGIN-DELAY, backs off exponentially on temporary errors and waits
``backoff_auth`` after authentication or SYS/PERM failures instead of hammering.
An exception that escapes a task's loop (a defect: a poll records its own errors) is
logged with its traceback and backed off like a failed poll, and the loop starts again:
it never ends the worker or its other mailboxes (MP-07).

Several workers (processes, machines) sharing one PostgreSQL journal split the mailboxes
through the leases (:mod:`mailpipe.leases`): the scheduler takes a mailbox's lease
before each poll, keeps it renewed while the poll runs, hands the engine its checks and
its fence (the lease epoch its journal commits are conditional on) and releases it after.
A worker that finds a mailbox leased elsewhere, or whose lease was lost or fenced off
mid-poll, waits :func:`~mailpipe.leases.lease_retry_delay` before trying again.

:meth:`Scheduler.request_stop` (SIGTERM/SIGINT) sets an event that the runners check
between messages: the message in hand finishes, what committed is DELE'd, QUIT is sent.

The poll records (for ``mailpipe status``; advisory, not delivery state) are written in
batches: one journal transaction for up to :data:`POLL_RECORD_BATCH` of them, at most
:data:`POLL_RECORD_DELAY` seconds after the poll, and the rest when the scheduler ends.
A cycle over many mailboxes with no new mail thus makes no journal commit per mailbox
for its records (issue 18).

Concurrency: a poll is mostly waits for the network (an empty POP3 poll is a dozen
round trips), so many polls overlap; the defaults (64 in all, 32 per server) come from
``bench/scale.py --rtt-ms`` (bench/RESULTS.md, issue 18). The per-server limit keeps a
worker with many mailboxes on one server within what a server grants one client
(Dovecot's login and mail process limits, providers' per-IP connection limits): the
host's slot is taken first, so mailboxes waiting for a busy server hold no global slot
that another server's mailboxes could use. The slots count polls, not connections:
a push source's wait between polls (IMAP IDLE and STATUS connections kept open) holds
no slot, or one mailbox's watch would block the polls of the others on its server;
the documentation of ``host_concurrency`` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import structlog

from mailpipe.chain import Chain
from mailpipe.config import Config, MailboxSpec, SchedulerConfig
from mailpipe.engine import (
    MailboxRunner,
    ProgressFn,
    Summary,
    wait_or_stop,
)
from mailpipe.errors import (
    AuthenticationError,
    SourceBusyError,
    SourcePermanentError,
)
from mailpipe.journal.base import Journal
from mailpipe.journal.errors import FencedError
from mailpipe.leases import LeaseLostError, MailboxLease, lease_retry_delay
from mailpipe.ledger import error_text
from mailpipe.plugin_manager import Hooks
from mailpipe.quarantine import Quarantine
from mailpipe.source import ClosableSource, PushSource

log = structlog.get_logger()

#: Poll records written in one journal transaction at most.
POLL_RECORD_BATCH = 100
#: Seconds a poll record waits for others at most before it is written.
POLL_RECORD_DELAY = 0.5


def next_delay(
    sched: SchedulerConfig,
    *,
    interval: float,
    jitter: float,
    failures: int,
    error: BaseException | None,
    rng: random.Random | None = None,
) -> float:
    """Return seconds to wait before the next poll of a mailbox.

    Success: ``interval`` spread by ``±jitter``. Authentication and SYS/PERM failures:
    ``backoff_auth``. Busy (IN-USE, LOGIN-DELAY, SYS/TEMP): the larger of the server's
    ``retry_after`` and the exponential back-off. Other failures: exponential from
    ``backoff_initial``, doubling per consecutive failure, capped at ``backoff_max``.
    """
    r = rng or random
    if error is None:
        spread = interval * jitter
        return max(0.0, interval + r.uniform(-spread, spread))
    # S-14: an auth refusal waits backoff_auth (1 h by default); never hammer a lockout.
    if isinstance(error, AuthenticationError | SourcePermanentError):
        return float(sched.backoff_auth)
    exp = float(
        min(sched.backoff_max, sched.backoff_initial * (2 ** max(0, failures - 1)))
    )
    exp = exp * r.uniform(0.8, 1.0)
    if isinstance(error, SourceBusyError) and error.retry_after:
        return max(exp, float(error.retry_after))
    return exp


#: Seconds :func:`close_sources` waits for every source's close together; a source
#: still closing after it (a hung server) is cancelled: shutdown does not grow with
#: the number of mailboxes.
CLOSE_TIMEOUT = 15.0


async def close_sources(
    runners: Iterable[MailboxRunner], *, timeout: float | None = None
) -> None:
    """Close every source that keeps connections between polls (IMAP push, IC-44),
    all at once, within ``timeout`` seconds in total (default :data:`CLOSE_TIMEOUT`;
    those still closing then are cancelled); a failure is logged, never raised."""
    timeout = CLOSE_TIMEOUT if timeout is None else timeout
    closing = {
        asyncio.ensure_future(_close_one(runner)): runner
        for runner in runners
        if isinstance(runner.source, ClosableSource)
    }
    if not closing:
        return
    try:
        _, late = await asyncio.wait(closing, timeout=timeout)
    finally:
        for task in closing:
            task.cancel()  # no-op for the finished ones
        await asyncio.gather(*closing, return_exceptions=True)
    for task in late:
        log.warning("source_close_timeout", mailbox=closing[task].name, seconds=timeout)


async def _close_one(runner: MailboxRunner) -> None:
    source = runner.source
    assert isinstance(source, ClosableSource)
    try:
        await source.close()
    except Exception as exc:  # the contract says never; shutdown goes on
        log.warning("source_close_failed", mailbox=runner.name, error=type(exc).__name__)


class _PollRecord(NamedTuple):
    """One queued :meth:`Journal.record_poll` call."""

    mailbox: str
    error: str
    error_type: str
    backlog: int | None
    next_poll: datetime | None


class _Slots:
    """A mailbox's turn to poll: a slot of its host's semaphore (when it has one),
    then one of the global semaphore; released in the reverse order."""

    __slots__ = ("host", "total")

    def __init__(self, host: asyncio.Semaphore | None, total: asyncio.Semaphore) -> None:
        self.host = host
        self.total = total

    async def __aenter__(self) -> None:
        if self.host is not None:
            await self.host.acquire()
        try:
            await self.total.acquire()
        except BaseException:
            if self.host is not None:
                self.host.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.total.release()
        if self.host is not None:
            self.host.release()


def source_host(spec: MailboxSpec) -> str | None:
    """The server a mailbox's source connects to (its ``host`` option, lower case),
    or None for a source without one."""
    host = getattr(spec.source_options, "host", None)
    return host.lower() if isinstance(host, str) and host else None


class Scheduler:
    """Runs :class:`~mailpipe.engine.MailboxRunner` for every enabled mailbox."""

    def __init__(
        self,
        config: Config,
        *,
        journal: Journal,
        hooks: Hooks,
        once: bool = False,
        only: Iterable[str] = (),
        progress: ProgressFn | None = None,
        owner: str | None = None,
    ) -> None:
        self.config = config
        self.journal = journal
        self.hooks = hooks
        self.once = once
        self.progress = progress
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.stop = asyncio.Event()
        wanted = set(only)
        self.mailboxes: list[MailboxSpec] = [
            m
            for m in config.mailboxes
            if m.config.enabled and (not wanted or m.name in wanted)
        ]
        self.summaries: list[Summary] = []
        self.last: dict[str, Summary] = {}
        self._records: list[_PollRecord] = []  # not yet written

    def request_stop(self) -> None:
        """Ask every mailbox to finish the message in hand, commit and stop."""
        if not self.stop.is_set():
            log.info("stop_requested")
        self.stop.set()

    async def run(self) -> list[Summary]:
        """Poll until stopped (or once each with ``once``); return every poll summary."""
        sched = self.config.model.scheduler
        chain = Chain.from_config(self.config)
        quarantine = Quarantine(self.config.resolve(self.config.model.quarantine.dir))
        total = asyncio.Semaphore(sched.concurrency)
        per_host: dict[str, asyncio.Semaphore] = {}
        slots: dict[str, _Slots] = {}
        for spec in self.mailboxes:
            host = source_host(spec)
            if host is not None and host not in per_host:
                per_host[host] = asyncio.Semaphore(sched.host_concurrency)
            slots[spec.name] = _Slots(None if host is None else per_host[host], total)
        await chain.open()
        runners: list[MailboxRunner] = []
        flusher = asyncio.create_task(self._flush_periodically())
        try:
            runners = [
                MailboxRunner(
                    spec,
                    config=self.config,
                    chain=chain,
                    journal=self.journal,
                    quarantine=quarantine,
                    hooks=self.hooks,
                    stop=self.stop,
                    progress=self.progress,
                )
                for spec in self.mailboxes
            ]
            await asyncio.gather(
                *(self._supervised(r, slots[r.name]) for r in runners)
            )
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            self._flush_records()
            await close_sources(runners)
            await chain.close()
        return self.summaries

    async def _supervised(self, runner: MailboxRunner, slots: _Slots) -> None:
        """:meth:`_loop` over ``runner``, started again after an exception that
        escaped it (MP-07).

        A poll records its own errors (:meth:`MailboxRunner.poll` never raises), so
        an exception here is a defect in the scheduling around it. It is logged
        with its traceback (``mailbox_loop_failed``) and backed off like a failed
        poll, then the mailbox's loop starts again: every other mailbox of the
        worker goes on meanwhile, and the worker does not exit. With ``once`` it
        counts as the mailbox's failed poll (``run --once`` exits 1).

        Either way the failure is that mailbox's latest summary and poll record (its
        error as :func:`~mailpipe.ledger.error_text` makes it: redacted, storable),
        and the source's kept connections (IMAP push) are closed: nothing watches
        them while the mailbox backs off, and the exception may have left them in
        any state (IC-44). ``_loop`` starts again with its counters reset; the back-off
        here grows with every exception of this mailbox (never reset: a defect that
        recurs after each poll settles at ``backoff_max``). Never returns
        before ``stop`` is set (or with ``once``, after one poll or failure); only
        :class:`Exception` is caught (cancellation and interrupts propagate)."""
        failures = 0
        while not self.stop.is_set():
            try:
                await self._loop(runner, slots)
                return
            except Exception as exc:
                failures += 1
                delay = self._delay(runner, failures, exc)
                error = error_text(exc)
                log.error(
                    "mailbox_loop_failed",
                    mailbox=runner.name,
                    error=error,
                    seconds=round(delay, 1),
                    failures=failures,
                    exc_info=True,
                )
                await close_sources([runner])
                failed = Summary(mailbox=runner.name, committed=False, error=error,
                                 error_type=type(exc).__name__)
                self.summaries.append(failed)
                self.last[runner.name] = failed
                self._record(failed, None if self.once else delay)
                if self.once:
                    return
                await wait_or_stop(self.stop, delay)

    def _delay(
        self, runner: MailboxRunner, failures: int, error: BaseException | None
    ) -> float:
        """Seconds before ``runner``'s next poll (:func:`next_delay` with its
        mailbox's ``poll_interval`` and ``jitter``)."""
        return next_delay(
            self.config.model.scheduler,
            interval=runner.cfg.poll_interval,
            jitter=runner.cfg.jitter,
            failures=failures,
            error=error,
        )

    async def _loop(self, runner: MailboxRunner, slots: _Slots) -> None:
        sched = self.config.model.scheduler
        failures = 0
        misses = 0  # consecutive polls that found the lease held elsewhere (or lost)
        polled_once = False
        woken = False  # the last wait ended because the source had new mail
        while not self.stop.is_set():
            async with slots:
                if self.stop.is_set():
                    break
                summary = await self._poll_locked(runner, misses=misses)
            polled_once = True
            if summary is not None:
                self.summaries.append(summary)
                self.last[runner.name] = summary
            error = runner.last_exception if summary and summary.error else None
            if summary is None or isinstance(error, LeaseLostError | FencedError):
                # Held (or taken over) by another worker: wait, then try again. The
                # source's kept connections (IMAP push) are closed meanwhile: the
                # mailbox is not this worker's to watch, and they would count against
                # the server's per-user connection limit (IC-44).
                misses += 1
                await close_sources([runner])
                if self.once:
                    self._record(summary, None)
                    break
                delay = lease_retry_delay(
                    interval=runner.cfg.poll_interval,
                    ttl=sched.lease_ttl,
                    misses=misses,
                )
                self._record(summary, delay)
                try:
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)
                except TimeoutError:
                    pass
                continue
            misses = 0
            failures = failures + 1 if error is not None else 0
            if self.once and polled_once:
                self._record(summary, None)
                break
            delay = self._delay(runner, failures, error)
            self._record(summary, delay)
            if error is not None:
                level = (
                    "error"
                    if isinstance(error, AuthenticationError | SourcePermanentError)
                    else "warning"
                )
                getattr(log, level)(
                    "mailbox_backoff",
                    mailbox=runner.name,
                    seconds=round(delay, 1),
                    failures=failures,
                    error_type=type(error).__name__,
                )
            if (
                error is None
                and isinstance(runner.source, PushSource)
                and runner.facts is not None
                and runner.facts.can_push
                # A wake-up whose poll found nothing to retrieve: the timer decides
                # the next poll, so a source that wakes too eagerly cannot spin.
                and not (woken and summary is not None and summary.retrieved == 0)
            ):
                woken = await self._wait_for_mail(runner, delay)
                continue
            woken = False
            try:
                await asyncio.wait_for(self.stop.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def _wait_for_mail(self, runner: MailboxRunner, delay: float) -> bool:
        """Between two polls of a push-capable source: wake on new mail, on stop, or
        after ``delay`` (the poll interval stays the upper bound). True when woken by
        new mail."""
        source = runner.source
        assert isinstance(source, PushSource)
        loop = asyncio.get_running_loop()
        started = loop.time()
        push = asyncio.ensure_future(source.wait_for_mail(delay))
        stop = asyncio.ensure_future(self.stop.wait())
        try:
            done, _ = await asyncio.wait({push, stop}, timeout=delay + 1.0,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (push, stop):
                task.cancel()
            await asyncio.gather(push, stop, return_exceptions=True)
        if push in done and not push.cancelled():
            exc = push.exception()
            if exc is not None:  # the contract says never; sleep the interval out
                log.warning("wait_for_mail_failed", mailbox=runner.name,
                            error=type(exc).__name__)
                await wait_or_stop(self.stop, delay)
                return False
            if push.result():
                log.info("mailbox_woken", mailbox=runner.name)
                return True
            # No new mail, but returned before its time (the server dropped IDLE, a
            # source that cannot push now): the timer decides, never a tight loop.
            await wait_or_stop(self.stop, delay - (loop.time() - started))
        return False

    def _record(self, summary: Summary | None, delay: float | None) -> None:
        """Queue the poll record of ``summary``'s mailbox (for ``mailpipe status``):
        its outcome, backlog and the next poll, ``delay`` seconds from now (None: no
        next poll). Nothing is written for a poll that did not happen (lease held
        elsewhere). Written by :meth:`_flush_records`, at once when the batch is full.
        """
        if summary is None:
            return
        next_poll = None
        if delay is not None:
            next_poll = datetime.now(UTC) + timedelta(seconds=delay)
        self._records.append(_PollRecord(
            summary.mailbox, summary.error or "", summary.error_type or "",
            summary.backlog, next_poll,
        ))
        if len(self._records) >= POLL_RECORD_BATCH:
            self._flush_records()

    def _flush_records(self) -> None:
        """Write the queued poll records in one journal transaction; a journal error
        is logged, never raised (the records are advisory, and are dropped)."""
        pending, self._records = self._records, []
        if not pending:
            return
        try:
            with self.journal.batch():
                for r in pending:
                    self.journal.record_poll(
                        r.mailbox, owner=self.owner, error=r.error,
                        error_type=r.error_type, backlog=r.backlog, next_poll=r.next_poll,
                    )
        except Exception as exc:
            log.warning(
                "poll_record_failed",
                mailboxes=len(pending),
                mailbox=pending[0].mailbox,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )

    async def _flush_periodically(self) -> None:
        """Write queued poll records every :data:`POLL_RECORD_DELAY` seconds."""
        while True:
            await asyncio.sleep(POLL_RECORD_DELAY)
            self._flush_records()

    async def _poll_locked(
        self, runner: MailboxRunner, *, misses: int = 0
    ) -> Summary | None:
        """Poll ``runner`` under its lease; None when the lease is held elsewhere (or
        the journal could not be asked). Only the first of consecutive misses logs at
        info level."""
        lease = MailboxLease(
            self.journal,
            runner.name,
            owner=self.owner,
            ttl=self.config.model.scheduler.lease_ttl,
        )
        try:
            acquired = lease.acquire()
        except Exception as exc:  # journal down: treated as a miss, retried later
            log.warning(
                "mailbox_lock_failed",
                mailbox=runner.name,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            return None
        if not acquired:
            level = "info" if misses == 0 else "debug"
            getattr(log, level)("mailbox_locked_elsewhere", mailbox=runner.name)
            return None
        stop_renewing = lease.renew_periodically()
        runner.lease_check = lease.check
        runner.ack_check = lease.check_fence
        runner.fence = lease.fence
        try:
            return await runner.poll()
        finally:
            runner.lease_check = runner.ack_check = None
            runner.fence = None
            stop_renewing()
            lease.release()
