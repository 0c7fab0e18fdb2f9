"""Polls many mailboxes: intervals with jitter, a concurrency limit, leases, back-off.

Theory of operation
-------------------
One asyncio task per enabled mailbox. Each task loops: take a slot of the global
concurrency semaphore, take the mailbox's lease in the journal (an exclusive lock across
processes and machines), poll, release both, then sleep. A successful poll sleeps
``poll_interval`` spread by ``jitter``; a failed one sleeps per :func:`next_delay`, which
honours the server's LOGIN-DELAY, backs off exponentially on temporary errors and waits
``backoff_auth`` after authentication or SYS/PERM failures instead of hammering.

Several workers (processes, machines) sharing one PostgreSQL journal split the mailboxes
through the leases (:class:`MailboxLease`): a lease lives ``lease_ttl`` seconds and is
renewed every ``lease_ttl / 3`` while the poll runs, so the time between renewals stays
well under the ttl; before every retrieval, DELE and QUIT the engine checks it (renewing
on the spot when the background renewal is late, e.g. after a blocked event loop) and
aborts the session without QUIT once it is lost. A worker that finds a mailbox leased
elsewhere waits :func:`lease_retry_delay` (growing with consecutive misses, at most
``lease_ttl / 2``), so it neither spins on the journal nor takes long to take over the
mailboxes of a dead worker: about ``1.5 * lease_ttl`` after the worker's last renewal
(``lease_ttl`` until its lease expires, ``lease_ttl / 2`` until the next retry).

:meth:`Scheduler.request_stop` (SIGTERM/SIGINT) sets an event that the runners check
between messages: the message in hand finishes, what committed is DELE'd, QUIT is sent.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

import structlog

from mailpipe.chain import Chain
from mailpipe.config import Config, MailboxSpec, SchedulerConfig
from mailpipe.engine import (
    LeaseLostError,
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
from mailpipe.plugin_manager import Hooks
from mailpipe.quarantine import Quarantine
from mailpipe.source import PushSource

log = structlog.get_logger()


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


def lease_retry_delay(
    *, interval: float, ttl: float, misses: int, rng: random.Random | None = None
) -> float:
    """Return seconds to wait after ``misses`` consecutive polls found the lease taken.

    Doubles from ``poll_interval`` per miss, capped at ``ttl / 2`` (but never below
    ``poll_interval``), spread by -20 %: the holder is serving the mailbox, so
    retrying sooner only loads the journal, and the cap bounds how long a dead worker's
    mailbox waits after its lease expired.
    """
    r = rng or random
    cap = max(interval, ttl / 2)
    base = min(cap, interval * (2 ** min(max(0, misses - 1), 30)))
    return float(base * r.uniform(0.8, 1.0))


class MailboxLease:
    """The lease on one mailbox for one poll: taken, renewed, checked, released.

    :attr:`expires` is a conservative local deadline (monotonic clock): the instant
    *before* the last successful lock or renew statement was sent plus ``ttl``, never
    later than the expiry the server recorded. Journal errors while renewing leave
    the deadline unchanged, so a lease that cannot be renewed runs out on its own.
    """

    def __init__(
        self,
        journal: Journal,
        mailbox: str,
        *,
        owner: str,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.journal = journal
        self.mailbox = mailbox
        self.owner = owner
        self.ttl = float(ttl)
        self._clock = clock
        self.expires = 0.0
        self.lost = False

    def acquire(self) -> bool:
        """Take the lease; False when another worker holds it."""
        started = self._clock()
        if not self.journal.lock_mailbox(self.mailbox, owner=self.owner, ttl=self.ttl):
            return False
        self.expires, self.lost = started + self.ttl, False
        return True

    def remaining(self) -> float:
        """Seconds the lease is surely still held (negative when past the deadline)."""
        return self.expires - self._clock()

    def renew(self) -> None:
        """Extend the lease by ``ttl``; sets :attr:`lost` when another worker has it."""
        if self.lost:
            return
        started = self._clock()
        try:
            held = self.journal.renew_mailbox(
                self.mailbox, owner=self.owner, ttl=self.ttl
            )
        except Exception as exc:  # journal unreachable: the deadline decides
            log.warning(
                "mailbox_lease_renew_failed",
                mailbox=self.mailbox,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            return
        if held:
            self.expires = started + self.ttl
            return
        self.lost = True
        log.error("mailbox_lease_lost", mailbox=self.mailbox, owner=self.owner)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless the lease is held ``ttl / 3`` longer.

        The engine calls this before every retrieval, DELE and QUIT. A renewal that is
        overdue (more than ``ttl / 3`` since the last one) is done here first.
        """
        if not self.lost and self.remaining() < self.ttl * 2 / 3:
            self.renew()
        if not self.lost and self.remaining() < self.ttl / 3:
            self.lost = True
            log.error(
                "mailbox_lease_expired",
                mailbox=self.mailbox,
                remaining=round(self.remaining(), 3),
            )
        if self.lost:
            raise LeaseLostError(
                f"the lease on mailbox {self.mailbox!r} was lost; session aborted",
                code="LEASE",
            )

    async def keep_renewed(self) -> None:
        """Renew every ``ttl / 3`` until cancelled or the lease is lost."""
        for _ in range(100_000_000):  # bounded; cancelled when the poll ends
            await asyncio.sleep(max(0.01, self.ttl / 3))
            self.renew()
            if self.lost:
                return

    def release(self) -> None:
        """Give the lease back (a no-op when another worker holds it now)."""
        try:
            self.journal.unlock_mailbox(self.mailbox, owner=self.owner)
        except Exception as exc:  # it expires on its own
            log.warning(
                "mailbox_unlock_failed",
                mailbox=self.mailbox,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )


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
        semaphore = asyncio.Semaphore(sched.concurrency)
        await chain.open()
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
            await asyncio.gather(*(self._loop(r, semaphore) for r in runners))
        finally:
            await chain.close()
        return self.summaries

    async def _loop(self, runner: MailboxRunner, semaphore: asyncio.Semaphore) -> None:
        sched = self.config.model.scheduler
        failures = 0
        misses = 0  # consecutive polls that found the lease held elsewhere (or lost)
        polled_once = False
        woken = False  # the last wait ended because the source had new mail
        while not self.stop.is_set():
            async with semaphore:
                if self.stop.is_set():
                    break
                summary = await self._poll_locked(runner, misses=misses)
            polled_once = True
            if summary is not None:
                self.summaries.append(summary)
                self.last[runner.name] = summary
            error = runner.last_exception if summary and summary.error else None
            if summary is None or isinstance(error, LeaseLostError):
                # Held (or taken over) by another worker: wait, then try again.
                misses += 1
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
            delay = next_delay(
                sched,
                interval=runner.cfg.poll_interval,
                jitter=runner.cfg.jitter,
                failures=failures,
                error=error,
            )
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
        return False

    def _record(self, summary: Summary | None, delay: float | None) -> None:
        """Write the poll record of ``summary``'s mailbox (for ``mailpipe status``):
        its outcome, backlog and the next poll, ``delay`` seconds from now (None: no
        next poll). Nothing is written for a poll that did not happen (lease held
        elsewhere); a journal error is logged, never raised (the record is advisory).
        """
        if summary is None:
            return
        next_poll = None
        if delay is not None:
            next_poll = datetime.now(UTC) + timedelta(seconds=delay)
        try:
            self.journal.record_poll(
                summary.mailbox,
                owner=self.owner,
                error=summary.error or "",
                error_type=summary.error_type or "",
                backlog=summary.backlog,
                next_poll=next_poll,
            )
        except Exception as exc:
            log.warning(
                "poll_record_failed",
                mailbox=summary.mailbox,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )

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
        renew = asyncio.create_task(lease.keep_renewed())
        runner.lease_check = lease.check
        try:
            return await runner.poll()
        finally:
            runner.lease_check = None
            renew.cancel()
            try:
                await renew
            except asyncio.CancelledError:
                pass
            lease.release()
