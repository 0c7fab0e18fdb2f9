"""``mailpipe run``: the scheduler over the configured mailboxes as a service.

Around :class:`~mailpipe.scheduler.Scheduler` it opens the journal, starts the metrics
endpoint (and the status page) when ``[metrics] listen`` is set, turns SIGTERM/SIGINT into a graceful stop
(after the message in hand) and, with ``once`` on a terminal, shows progress and a
table of each mailbox's summary.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Protocol

import structlog

from mailpipe.app import App
from mailpipe.errors import StartupError
from mailpipe.journal.base import PollRecord
from mailpipe.logs import on_terminal
from mailpipe.plugin_manager import Hooks
from mailpipe.progress import ProgressView
from mailpipe.scheduler import Scheduler


class _Stoppable(Protocol):
    """What :func:`run_pipelines` needs of the metrics server (imported lazily)."""

    async def stop(self) -> None: ...


log = structlog.get_logger()


async def run_pipelines(app: App, *, once: bool, only: tuple[str, ...] = ()) -> bool:
    """Poll the mailboxes of ``app`` (all enabled ones, or ``only``) until stopped.

    With ``once`` every mailbox is polled once. Returns False when, with ``once``, a
    mailbox could not be polled; True otherwise. A mailbox whose lease another process
    holds is not a failure: that process polls it.

    :raises StartupError: the metrics endpoint cannot listen.
    """
    journal = app.journal()
    try:
        metrics_server = await _start_metrics(app)
    except BaseException:
        journal.close()
        raise
    # Bars only where log lines share their console (never beside raw JSON lines).
    view = ProgressView(enabled=once and on_terminal())
    scheduler = Scheduler(
        app.config,
        journal=journal,
        hooks=Hooks(app.pm),
        once=once,
        only=only,
        progress=view.update,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, scheduler.request_stop)
    try:
        with view:
            summaries = await scheduler.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        journal.close()
        if metrics_server is not None:
            await metrics_server.stop()
    if once:
        view.table(summaries)
        # A mailbox whose lease another process holds is not a failure: that process
        # polls it (the scheduler logs mailbox_locked_elsewhere).
        return not any(s.error for s in summaries)
    return True


def _journal_polls(app: App) -> dict[str, PollRecord]:
    """The journal's poll records (for ``mailpipe_next_poll_timestamp_seconds``)."""
    journal = app.journal(read_only=True)
    try:
        return journal.polls()
    finally:
        journal.close()


async def _start_metrics(app: App) -> _Stoppable | None:
    listen = app.config.model.metrics.listen
    if not listen:
        return None
    # Imported only with [metrics] listen set: a run without it never pays (issue 18).
    from mailpipe.metrics import MetricsCollector, MetricsServer
    from mailpipe.status_page import StatusPage

    enabled = [m for m in app.config.mailboxes if m.config.enabled]
    collector = MetricsCollector(
        [m.name for m in enabled],
        unhealthy_after=app.config.model.metrics.unhealthy_after,
        intervals={m.name: float(m.config.poll_interval) for m in enabled},
        quarantine=app.quarantine(),
        polls=lambda: _journal_polls(app),
    )
    app.pm.register(collector, "metrics")
    host, _, port = listen.rpartition(":")
    page = StatusPage(app, collector, token=app.config.model.metrics.admin_token)
    server = MetricsServer(
        collector,
        host.strip("[]"),
        int(port),
        page=page,
        hosts=app.config.model.metrics.hosts,
    )
    try:
        await server.start()
    except OSError as exc:  # e.g. the port is taken: one line, exit 1
        # asyncio's strerror repeats every address it tried; the errno says it all
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise StartupError(f"metrics.listen: cannot listen on {listen}: {why}") from exc
    log.info("metrics_listening", host=server.host, port=server.port)
    return server
