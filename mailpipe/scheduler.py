"""Polls many mailboxes: intervals with jitter, a concurrency limit, leases, back-off.

Theory of operation
-------------------
One asyncio task per enabled mailbox. Each task loops: take a slot of the global
concurrency semaphore, take the mailbox's lease in the journal (an exclusive lock across
processes and machines), poll, release both, then sleep. A successful poll sleeps
``poll_interval`` spread by ``jitter``; a failed one sleeps per :func:`next_delay`, which
honours the server's LOGIN-DELAY, backs off exponentially on temporary errors and waits
``backoff_auth`` after authentication or SYS/PERM failures instead of hammering.

:meth:`Scheduler.request_stop` (SIGTERM/SIGINT) sets an event that the runners check
between messages: the message in hand finishes, what committed is DELE'd, QUIT is sent.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Iterable

import structlog

from mailpipe.chain import Chain
from mailpipe.config import Config, MailboxSpec, SchedulerConfig
from mailpipe.engine import MailboxRunner, ProgressFn, Summary
from mailpipe.errors import (
    AuthenticationError,
    SourceBusyError,
    SourcePermanentError,
)
from mailpipe.journal.base import Journal
from mailpipe.plugin_manager import Hooks
from mailpipe.quarantine import Quarantine

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
    if isinstance(error, AuthenticationError | SourcePermanentError):
        return float(sched.backoff_auth)
    exp = float(
        min(sched.backoff_max, sched.backoff_initial * (2 ** max(0, failures - 1)))
    )
    exp = exp * r.uniform(0.8, 1.0)
    if isinstance(error, SourceBusyError) and error.retry_after:
        return max(exp, float(error.retry_after))
    return exp


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
        chain = Chain(
            self.config.pipelines,
            base_dir=self.config.base_dir,
            on_complete={
                n: p.on_complete for n, p in self.config.model.pipelines.items()
            },
        )
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
        polled_once = False
        while not self.stop.is_set():
            async with semaphore:
                if self.stop.is_set():
                    break
                summary = await self._poll_locked(runner)
            polled_once = True
            if summary is not None:
                self.summaries.append(summary)
                self.last[runner.name] = summary
            error = runner.last_exception if summary and summary.error else None
            failures = failures + 1 if error is not None else 0
            if self.once and polled_once and (summary is not None or failures > 0):
                break
            delay = next_delay(
                sched,
                interval=runner.cfg.poll_interval,
                jitter=runner.cfg.jitter,
                failures=failures,
                error=error,
            )
            if summary is None:  # lease held elsewhere: try again after a short wait
                delay = min(delay, runner.cfg.poll_interval)
                if self.once:
                    break
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
            try:
                await asyncio.wait_for(self.stop.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def _poll_locked(self, runner: MailboxRunner) -> Summary | None:
        ttl = self.config.model.scheduler.lease_ttl
        if not self.journal.lock_mailbox(runner.name, owner=self.owner, ttl=ttl):
            log.info("mailbox_locked_elsewhere", mailbox=runner.name)
            return None
        renew = asyncio.create_task(self._renew(runner.name, ttl))
        try:
            return await runner.poll()
        finally:
            renew.cancel()
            try:
                await renew
            except asyncio.CancelledError:
                pass
            self.journal.unlock_mailbox(runner.name, owner=self.owner)

    async def _renew(self, mailbox: str, ttl: float) -> None:
        for _ in range(10_000_000):  # bounded; cancelled when the poll ends
            await asyncio.sleep(max(1.0, ttl / 3))
            if not self.journal.renew_mailbox(mailbox, owner=self.owner, ttl=ttl):
                log.error("mailbox_lease_lost", mailbox=mailbox)
                return
