"""Prometheus metrics and a health endpoint for ``mailpipe run``.

The collector is an ordinary pluggy plugin implementing the observe-only event hooks, so
metrics see exactly what every other plugin sees. :class:`MetricsServer` serves
``GET /metrics`` (Prometheus text format), ``GET /healthz`` (200 while every enabled
mailbox succeeded within ``unhealthy_after``, else 503 with the stale mailboxes; the
rule is :func:`is_stale`, which ``mailpipe status`` applies to the journal's records;
503 at once too for a mailbox whose OAuth grant is revoked, see
:mod:`mailpipe.oauth.gauges`) and the status page at ``/`` (:mod:`mailpipe.status_page`).
The OAuth token metrics come from :mod:`mailpipe.oauth.gauges`. The metric names are
the contract of ``deploy/prometheus`` and ``deploy/grafana`` (tests/test_dashboards.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog

from mailpipe.hookspecs import hookimpl
from mailpipe.secrets import redact

if TYPE_CHECKING:
    from mailpipe.journal.base import PollRecord
    from mailpipe.quarantine import Quarantine
    from mailpipe.status_page import StatusPage

from mailpipe.oauth.gauges import revoked as oauth_revoked

#: Poll error types counted as rejected logins (OAuth grant failures among them).
AUTH_ERROR_TYPES = frozenset(
    {"AuthenticationError", "GrantRevoked", "ClientRejected", "NoRefreshToken",
     "SealError"}
)

log = structlog.get_logger()


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


@dataclass(frozen=True, slots=True)
class Failure:
    """One recent failure for the status page: a failed poll or a failed message."""

    at: float  # Unix time
    mailbox: str
    kind: str  # the exception class, e.g. AuthenticationError
    error: str  # one line, redacted
    where: str  # "poll" or "step NAME, uid UID"


#: How many recent failures the status page keeps (oldest dropped first).
RECENT_FAILURES: Final = 50


class MetricsCollector:
    """Event-hook plugin that keeps Prometheus metrics per mailbox.

    ``intervals`` (mailbox → poll interval, seconds) is exported as
    ``mailpipe_poll_interval_seconds`` so that an alert can say "no poll for N
    intervals"; ``quarantine`` is counted at every scrape
    (``mailpipe_quarantine_messages`` and ``_bytes`` per mailbox). ``polls`` returns
    the journal's poll records (:meth:`mailpipe.journal.base.Journal.polls`); read at
    every scrape, their ``next_poll`` (when the scheduler plans the next poll, back-off
    included) is exported as ``mailpipe_next_poll_timestamp_seconds``, absent for a
    mailbox with no poll planned. A failing read keeps the previous values (logged).
    """

    def __init__(
        self,
        mailboxes: list[str],
        *,
        unhealthy_after: float,
        intervals: dict[str, float] | None = None,
        quarantine: Quarantine | None = None,
        polls: Callable[[], Mapping[str, PollRecord]] | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.unhealthy_after = unhealthy_after
        self.started = time.time()
        self.mailboxes = list(mailboxes)
        self.last_success: dict[str, float] = {}
        self.quarantine = quarantine
        self.polls = polls
        self.failures: deque[Failure] = deque(maxlen=RECENT_FAILURES)
        label = ["mailbox"]
        r = self.registry
        self.g_last_poll = Gauge(
            "mailpipe_last_poll_timestamp_seconds",
            "Unix time a poll last finished, successful or not.",
            label,
            registry=r,
        )
        self.g_interval = Gauge(
            "mailpipe_poll_interval_seconds",
            "The configured time between polls.",
            label,
            registry=r,
        )
        for mailbox, seconds in (intervals or {}).items():
            self.g_interval.labels(mailbox).set(seconds)
        self.g_next_poll = Gauge(
            "mailpipe_next_poll_timestamp_seconds",
            "Unix time the next poll is planned (back-off included), per the journal.",
            label,
            registry=r,
        )
        self.g_quarantine = Gauge(
            "mailpipe_quarantine_messages",
            "Messages in the quarantine now (counted at each scrape).",
            label,
            registry=r,
        )
        self.g_quarantine_bytes = Gauge(
            "mailpipe_quarantine_bytes",
            "Size of the quarantined messages now (counted at each scrape).",
            label,
            registry=r,
        )
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
        # one clock reading: a successful poll has last success == last poll, so
        # "last poll after last success" means the last poll failed (alert rules)
        now = time.time()
        self.g_last_poll.labels(mailbox).set(now)
        if summary.get("error"):
            kind = str(summary.get("error_type") or "error")
            self.c_poll_failures.labels(mailbox, kind).inc()
            self._remember(mailbox, kind, str(summary["error"]), "poll")
            if kind in AUTH_ERROR_TYPES:
                self.c_auth_failures.labels(mailbox).inc()
        else:
            self.last_success[mailbox] = now
            self.g_last_success.labels(mailbox).set(now)

    @hookimpl
    def mailpipe_message_failed(
        self, mailbox: str, uid: str, key: str, processor: str, error: str, attempts: int
    ) -> None:
        """Remember the failure for the status page."""
        kind, _, text = error.partition(": ")
        if not text or " " in kind:
            kind, text = "error", error
        self._remember(
            mailbox, kind, text, f"step {processor}, uid {uid}, attempt {attempts}"
        )

    def _remember(self, mailbox: str, kind: str, error: str, where: str) -> None:
        line = " ".join(redact(error).split())
        self.failures.append(
            Failure(time.time(), mailbox, kind, line[:300], where)
        )

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

    def _planned_polls(self, polls: Callable[[], Mapping[str, PollRecord]]) -> None:
        try:
            records = polls()
        except Exception as exc:  # a scrape must not fail for the journal
            log.warning(
                "metrics_polls_unreadable",
                error=redact(f"{type(exc).__name__}: {exc}")[:300],
            )
            return
        for mailbox in self.mailboxes:
            record = records.get(mailbox)
            if record is not None and record.next_poll is not None:
                self.g_next_poll.labels(mailbox).set(record.next_poll.timestamp())
            else:
                self.g_next_poll.remove(mailbox)  # no-op when absent

    def render(self) -> bytes:
        """Return the Prometheus text exposition (the quarantine counted now)."""
        from prometheus_client import generate_latest

        if self.quarantine is not None:
            counts: dict[str, list[int]] = {m: [0, 0] for m in self.mailboxes}
            for item in self.quarantine.list():
                count = counts.setdefault(item.mailbox, [0, 0])
                count[0] += 1
                count[1] += item.size
            for mailbox, (n, size) in counts.items():
                self.g_quarantine.labels(mailbox).set(n)
                self.g_quarantine_bytes.labels(mailbox).set(size)
        if self.polls is not None:
            self._planned_polls(self.polls)
        return generate_latest(self.registry)


#: The largest request body the listener reads (a status page form is far smaller).
MAX_BODY: Final = 16 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request as the listener read it; header names are lowercase."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP response; ``headers`` are added after Content-Type and -Length."""

    status: str
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class MetricsServer:
    """A minimal asyncio HTTP server for ``/metrics``, ``/healthz`` and, when a
    :class:`~mailpipe.status_page.StatusPage` is given, the status page at ``/``.

    Contract: one request per connection (``Connection: close``); request line and
    headers bounded (100 lines, 10 s and 64 KiB each: 400 beyond); a body only with
    a Content-Length of ASCII digits (400 otherwise) of at most :data:`MAX_BODY`
    octets (413 beyond). The status page at ``/`` answers only a ``Host`` that is
    an IP address, ``localhost``, the listen host or one of ``hosts`` (any port):
    421 otherwise, so a page whose DNS name was re-pointed at this listener (DNS
    rebinding) cannot read or post to it. ``/metrics`` and ``/healthz`` answer any
    ``Host``: Prometheus and probes reach them by names of their own choosing.
    """

    def __init__(
        self,
        collector: MetricsCollector,
        host: str,
        port: int,
        *,
        page: StatusPage | None = None,
        hosts: Iterable[str] = (),
    ) -> None:
        self.collector = collector
        self.host = host
        self.port = port
        self.page = page
        self.hosts = frozenset(
            {"localhost", host.lower(), *(name.lower() for name in hosts)}
        )
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
            try:
                request = await _read_request(reader)
            except (ValueError, asyncio.LimitOverrunError):
                # a line over the reader's 64 KiB limit, or a bad Content-Length
                reply = Response("400 Bad Request", "text/plain", b"bad request\n")
            else:
                reply = await self._answer(request)
            head = [
                f"HTTP/1.1 {reply.status}",
                f"Content-Type: {reply.content_type}",
                f"Content-Length: {len(reply.body)}",
                *(f"{name}: {value}" for name, value in reply.headers),
                "Connection: close",
            ]
            writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + reply.body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, request: Request | None) -> Response:
        if request is None:
            return Response("413 Content Too Large", "text/plain", b"too large\n")
        try:
            return await self._route(request)
        except Exception as exc:  # one bad request must not stop the listener
            log.error(
                "metrics_request_failed",
                path=request.path,
                error=redact(f"{type(exc).__name__}: {exc}"),
            )
            return Response(
                "500 Internal Server Error", "text/plain", b"internal error\n"
            )

    async def _route(self, request: Request) -> Response:
        if request.path == "/metrics" and request.method == "GET":
            return Response(
                "200 OK", "text/plain; version=0.0.4", self.collector.render()
            )
        if request.path == "/healthz" and request.method == "GET":
            ok, detail = self.collector.health()
            status = "200 OK" if ok else "503 Service Unavailable"
            return Response(status, "application/json", json.dumps(detail).encode())
        if request.path == "/" and self.page is not None:
            if not _known_host(request.headers.get("host", ""), self.hosts):
                return Response(
                    "421 Misdirected Request",
                    "text/plain",
                    b"this page answers only to an IP address, localhost or a name "
                    b"in [metrics] hosts\n",
                )
            if request.method == "GET":
                return await self.page.get()
            if request.method == "POST":
                return await self.page.post(request)
            return Response(
                "405 Method Not Allowed", "text/plain", b"GET or POST\n",
                (("Allow", "GET, POST"),),
            )
        return Response("404 Not Found", "text/plain", b"not found\n")


def _known_host(host: str, names: frozenset[str]) -> bool:
    """True when the ``Host`` header ``host`` (``name``, ``name:port``, ``[v6]:port``)
    is an IP address or one of ``names`` (lowercase); the port does not matter."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, _ = host[1:].partition("]")
        if not bracket:
            return False
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name in names
    return True


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read one request (None: its body is over :data:`MAX_BODY`).

    :raises ValueError: a line over the reader's limit (64 KiB), or a Content-Length
        that is not ASCII digits.
    """
    line = await asyncio.wait_for(reader.readline(), 10)
    headers: dict[str, str] = {}
    for _ in range(100):  # bounded
        h = await asyncio.wait_for(reader.readline(), 10)
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    parts = line.decode("latin-1").split()
    method = parts[0].upper() if parts else "GET"
    target = parts[1] if len(parts) > 1 else "/"
    path, _, query = target.partition("?")
    body = b""
    length = headers.get("content-length", "0")
    if not (length.isascii() and length.isdigit()):  # '²'.isdigit() is True
        raise ValueError(f"bad Content-Length {length[:20]!r}")
    size = int(length)
    if size > MAX_BODY:
        return None
    if size:
        body = await asyncio.wait_for(reader.readexactly(size), 10)
    return Request(method, path, query, headers, body)


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
