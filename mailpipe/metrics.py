"""Prometheus metrics and a health endpoint for ``mailpipe run``.

The collector is an ordinary pluggy plugin implementing the observe-only event hooks, so
metrics see exactly what every other plugin sees. :class:`MetricsServer` serves
``GET /metrics`` (Prometheus text format) and ``GET /healthz`` (200 while every enabled
mailbox succeeded within ``unhealthy_after``, else 503 with the stale mailboxes; the
rule is :func:`is_stale`, which ``mailpipe status`` applies to the journal's records;
503 at once too for a mailbox whose OAuth grant is revoked, see
:mod:`mailpipe.oauth.gauges`). The OAuth token metrics come from the same module.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from mailpipe.hookspecs import hookimpl
from mailpipe.oauth.gauges import revoked as oauth_revoked

#: Poll error types counted as rejected logins (OAuth grant failures among them).
AUTH_ERROR_TYPES = frozenset(
    {"AuthenticationError", "GrantRevoked", "ClientRejected", "NoRefreshToken"}
)


def is_stale(
    last_success: float | None, *, since: float, now: float, unhealthy_after: float
) -> bool:
    """The health rule of ``/healthz`` (and ``mailpipe status``), for one mailbox.

    A mailbox is unhealthy (stale) when it has not succeeded for more than
    ``unhealthy_after`` seconds: counted from ``last_success`` (Unix time), or from
    ``since`` (when watching began) if it never succeeded. Failed polls in between do
    not matter while the last success is recent enough.
    """
    reference = since if last_success is None else last_success
    return now - reference > unhealthy_after


class MetricsCollector:
    """Event-hook plugin that keeps Prometheus metrics per mailbox."""

    def __init__(self, mailboxes: list[str], *, unhealthy_after: float) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.unhealthy_after = unhealthy_after
        self.started = time.time()
        self.mailboxes = list(mailboxes)
        self.last_success: dict[str, float] = {}
        label = ["mailbox"]
        r = self.registry
        self.g_last_success = Gauge(
            "mailpipe_last_success_timestamp_seconds",
            "Unix time of the last successful poll.",
            label,
            registry=r,
        )
        self.c_messages = Counter(
            "mailpipe_messages_total",
            "Messages by outcome.",
            ["mailbox", "outcome"],
            registry=r,
        )
        self.c_bytes = Counter(
            "mailpipe_retrieved_bytes_total", "Octets retrieved.", label, registry=r
        )
        self.h_poll = Histogram(
            "mailpipe_poll_duration_seconds", "Duration of a poll.", label, registry=r
        )
        self.g_backlog = Gauge(
            "mailpipe_server_backlog_messages",
            "Messages on the server at the last poll.",
            label,
            registry=r,
        )
        self.c_auth_failures = Counter(
            "mailpipe_authentication_failures_total",
            "Rejected logins.",
            label,
            registry=r,
        )
        self.c_poll_failures = Counter(
            "mailpipe_poll_failures_total",
            "Polls that failed.",
            ["mailbox", "error"],
            registry=r,
        )

        from mailpipe.oauth.gauges import OAuthMetrics

        r.register(OAuthMetrics())  # token expiry, refreshes, refresh-token risk

    @hookimpl
    def mailpipe_session_started(self, mailbox: str, count: int, octets: int) -> None:
        """Record the server backlog (UIDL/LIST count)."""
        self.g_backlog.labels(mailbox).set(count)

    @hookimpl
    def mailpipe_session_finished(self, mailbox: str, summary: dict[str, Any]) -> None:
        """Count outcomes and record success time or failure kind."""
        for outcome in (
            "retrieved",
            "processed",
            "dropped",
            "kept",
            "failed",
            "quarantined",
            "deleted",
        ):
            n = int(summary.get(outcome) or 0)
            if n:
                self.c_messages.labels(mailbox, outcome).inc(n)
        self.c_bytes.labels(mailbox).inc(int(summary.get("bytes") or 0))
        self.h_poll.labels(mailbox).observe(float(summary.get("seconds") or 0.0))
        if summary.get("error"):
            kind = str(summary.get("error_type") or "error")
            self.c_poll_failures.labels(mailbox, kind).inc()
            if kind in AUTH_ERROR_TYPES:
                self.c_auth_failures.labels(mailbox).inc()
        else:
            now = time.time()
            self.last_success[mailbox] = now
            self.g_last_success.labels(mailbox).set(now)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Return (healthy, detail): stale mailboxes have not succeeded in time."""
        now = time.time()
        stale = [
            m
            for m in self.mailboxes
            if is_stale(
                self.last_success.get(m),
                since=self.started,
                now=now,
                unhealthy_after=self.unhealthy_after,
            )
        ]
        # A dead OAuth grant will not heal by waiting: unhealthy at once.
        revoked = {m: c for m, c in oauth_revoked().items() if m in self.mailboxes}
        healthy = not stale and not revoked
        detail: dict[str, Any] = {"healthy": healthy, "stale": stale}
        if revoked:
            detail["oauth_revoked"] = revoked
        return healthy, detail

    def render(self) -> bytes:
        """Return the Prometheus text exposition."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsServer:
    """A minimal asyncio HTTP server for ``/metrics`` and ``/healthz``."""

    def __init__(self, collector: MetricsCollector, host: str, port: int) -> None:
        self.collector = collector
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; ``port`` 0 picks a free port (then read :attr:`port`)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            for _ in range(100):  # drain headers, bounded
                h = await asyncio.wait_for(reader.readline(), 10)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if path == "/metrics":
                status, ctype, body = (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    self.collector.render(),
                )
            elif path == "/healthz":
                ok, detail = self.collector.health()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "application/json", json.dumps(detail).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def healthz_url(listen: str) -> str:
    """The ``/healthz`` URL that a probe on this host uses for ``listen``.

    ``listen`` is ``[metrics] listen`` (``host:port`` or ``[v6]:port``). A wildcard
    host (``0.0.0.0``, ``::``, empty) is reached on loopback of the same family,
    as a container's ``HEALTHCHECK`` runs inside the container's network.
    """
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{int(port)}/healthz"


def probe(listen: str | None, *, timeout: float = 5.0) -> tuple[bool, str]:
    """Ask a running ``mailpipe run`` whether it is healthy.

    Contract: ``listen`` None (metrics off) is healthy with nothing asked, since
    there is no endpoint to probe; otherwise healthy exactly when ``GET /healthz``
    answers 200 within ``timeout`` seconds. Never raises for a network failure:
    a refused or timed-out connection is ``(False, reason)``.

    :returns: ``(healthy, one line for a human)``.
    """
    if not listen:
        return True, "metrics off ([metrics] listen unset): nothing to check"
    import urllib.error
    import urllib.request

    url = healthz_url(listen)
    try:
        # The URL is built from host:port above: always http://, never a file: URL.
        # A loopback probe never goes through an HTTP proxy (http_proxy set in a
        # container must not make a healthy worker look unhealthy).
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=timeout) as reply:
            body = reply.read(4096).decode("utf-8", "replace").strip()
            return reply.status == 200, f"{url}: {reply.status} {body}"
    except urllib.error.HTTPError as exc:
        body = exc.read(4096).decode("utf-8", "replace").strip()
        return False, f"{url}: {exc.code} {body}"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{url}: {reason}"
