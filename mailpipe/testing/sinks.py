"""Real SMTP and HTTP servers on 127.0.0.1 that record what they receive (forwarder tests).

Both sinks are plain context managers that run their server on a background thread, so
they work the same from sync and async tests::

    with SmtpSink(tls="starttls", auth={"bob": "pw"}) as sink:
        ...  # send to 127.0.0.1:sink.port, trusting sink.ca_file
        assert sink.messages[0].rcpt_tos == ["to@example.org"]

    with HttpSink(responses=[503, 200]) as sink:
        ...  # POST to sink.url
        assert [r.status for r in sink.requests] == [503, 200]

TLS certificates come from a throw-away trustme CA whose PEM file is ``sink.ca_file``;
clients that do not trust it fail verification, as they should.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import json
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from mailpipe.testing.lifecycle import Service

__all__ = ["HttpSink", "ReceivedMail", "ReceivedRequest", "SinkResponse", "SmtpSink"]

TlsMode = Literal["starttls", "implicit"]
_START_TIMEOUT = 10.0


class _Tls:
    """A throw-away trustme CA and a server certificate for 127.0.0.1 and localhost."""

    def __init__(self) -> None:
        import trustme

        self._ca = trustme.CA()
        self._cert = self._ca.issue_cert("127.0.0.1", "localhost")
        fd, name = tempfile.mkstemp(prefix="mailpipe-sink-ca-", suffix=".pem")
        os.close(fd)
        self.ca_file = Path(name)
        self._ca.cert_pem.write_to_path(str(self.ca_file))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(ctx)
        return ctx

    def cleanup(self) -> None:
        self.ca_file.unlink(missing_ok=True)


# --- SMTP -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceivedMail:
    """One message accepted by :class:`SmtpSink`: envelope, exact DATA bytes, session facts.

    ``data`` is the content after dot-unstuffing, as the server stored it; ``login`` is the
    authenticated user or None; ``tls`` tells whether the session was encrypted.
    """

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    rcpt_options: list[str]
    login: str | None
    tls: bool

    @property
    def email(self) -> EmailMessage:
        """The DATA bytes parsed by the stdlib (``policy=default``)."""
        parsed = BytesParser(policy=email.policy.default).parsebytes(self.data)
        assert isinstance(parsed, EmailMessage)
        return parsed


class _SmtpHandler:
    """aiosmtpd handler: answers per the sink's settings and records accepted mail."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    def _reply(self, stage: str) -> str | None:
        code = self.sink.reply_code
        if code is not None and self.sink.reply_at == stage:
            return (
                f"{code} {'4.3.0 try again later' if code < 500 else '5.7.1 rejected'}"
            )
        return None

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.sink.auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        reply = self._reply("mail")
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.sink.refuse:
            return f"{self.sink.refuse[address]} 5.1.1 recipient refused"
        reply = self._reply("rcpt")
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self._reply("data")
        if reply:
            return reply
        auth = session.auth_data  # LoginPassword for PLAIN/LOGIN
        login = getattr(auth, "login", None)
        transport = server.transport
        encrypted = session.ssl is not None or (
            transport is not None and transport.get_extra_info("ssl_object") is not None
        )
        mail = ReceivedMail(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or envelope.content or b""),
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            login=login.decode() if isinstance(login, bytes) else login,
            tls=encrypted,
        )
        self.sink._record(mail)
        return "250 2.0.0 OK queued"


class SmtpSink(Service):
    """A real aiosmtpd server on 127.0.0.1 (a free port) that records accepted messages.

    :param tls: None (plain), ``"starttls"`` (STARTTLS offered and required) or
        ``"implicit"`` (TLS from the first byte, as on port 465).
    :param auth: ``{user: password}``; when given, AUTH PLAIN/LOGIN is offered and MAIL
        without authentication is refused with 530.
    :param reply_code: when set, answer this code at ``reply_at`` (``"mail"``, ``"rcpt"``
        or ``"data"``) instead of accepting; may be changed while the sink runs.
    :param refuse: ``{recipient: code}`` for recipients refused at RCPT.
    :param smtputf8: advertise SMTPUTF8 (8BITMIME is always advertised).
    :param auth_mechanisms: the AUTH mechanisms offered (aiosmtpd has PLAIN and LOGIN).

    Attributes while running: ``host``, ``port``, ``ca_file`` (PEM path of the CA, None
    without TLS), ``messages`` (a snapshot list of :class:`ReceivedMail`),
    ``connections`` (client connections accepted) and ``auth_attempts``.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        tls: TlsMode | None = None,
        auth: Mapping[str, str] | None = None,
        reply_code: int | None = None,
        reply_at: Literal["mail", "rcpt", "data"] = "data",
        refuse: Mapping[str, int] | None = None,
        smtputf8: bool = True,
        auth_mechanisms: Sequence[str] = ("PLAIN", "LOGIN"),
    ) -> None:
        if tls not in (None, "starttls", "implicit"):
            raise ValueError("tls is None, 'starttls' or 'implicit'")
        self.tls = tls
        self.auth = dict(auth or {})
        self.reply_code = reply_code
        self.reply_at = reply_at
        self.refuse = dict(refuse or {})
        self.smtputf8 = smtputf8
        self.auth_mechanisms = [m.upper() for m in auth_mechanisms]
        self.port = 0
        self.ca_file: Path | None = None
        self.auth_attempts: list[tuple[str, bool]] = []
        self.connections = 0
        self._protocols: list[Any] = []
        self._messages: list[ReceivedMail] = []
        self._lock = threading.Lock()
        self._tls: _Tls | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def messages(self) -> list[ReceivedMail]:
        """Every message accepted so far, oldest first (a copy)."""
        with self._lock:
            return list(self._messages)

    def _record(self, mail: ReceivedMail) -> None:
        with self._lock:
            self._messages.append(mail)

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        ok = False
        user = ""
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            password = auth_data.password.decode("utf-8", "replace")
            ok = self.auth.get(user) == password
        with self._lock:
            self.auth_attempts.append((user, ok))
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    def start(self) -> None:
        """Start the server thread and wait until it listens (idempotent)."""
        if self._thread is not None:
            return
        self._ready.clear()
        self._error = None
        if self.tls is not None:
            self._tls = _Tls()
            self.ca_file = self._tls.ca_file
        self._thread = threading.Thread(target=self._run, name="smtp-sink", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT) or self._error is not None:
            self.stop()
            raise RuntimeError(f"SmtpSink did not start: {self._error!r}")

    def _run(self) -> None:
        from aiosmtpd.smtp import SMTP

        loop = asyncio.new_event_loop()
        self._loop = loop
        handler = _SmtpHandler(self)
        server_ctx = self._tls.server_context() if self._tls else None
        protocols = self._protocols

        def factory() -> Any:
            smtp = SMTP(
                handler,
                loop=loop,
                hostname="sink.localhost",
                enable_SMTPUTF8=self.smtputf8,
                decode_data=False,
                tls_context=server_ctx if self.tls == "starttls" else None,
                require_starttls=self.tls == "starttls",
                # Implicit TLS is encrypted from the start, so AUTH needs no STARTTLS.
                auth_require_tls=self.tls == "starttls",
                authenticator=self._authenticate if self.auth else None,
                auth_exclude_mechanism=[
                    m for m in ("PLAIN", "LOGIN") if m not in self.auth_mechanisms
                ],
                timeout=30,
            )
            with self._lock:
                protocols.append(smtp)
                self.connections += 1
            return smtp

        async def serve() -> None:
            self._stop = asyncio.Event()
            server = await loop.create_server(
                factory,
                self.host,
                0,
                ssl=server_ctx if self.tls == "implicit" else None,
            )
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                server.close()
                self._close_transports()
                await asyncio.sleep(0)

        try:
            loop.run_until_complete(serve())
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    def _close_transports(self) -> None:
        with self._lock:
            protocols = list(self._protocols)
        for smtp in protocols:
            if smtp.transport is not None:
                smtp.transport.close()

    def disconnect_all(self) -> None:
        """Fault injection: drop every open client connection (as an idle timeout does)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        done = threading.Event()

        def close() -> None:
            self._close_transports()
            done.set()

        loop.call_soon_threadsafe(close)
        done.wait(_START_TIMEOUT)

    def stop(self) -> None:
        """Stop the server, join its thread and delete the CA file."""
        thread, self._thread = self._thread, None
        if thread is not None:
            loop, stop = self._loop, self._stop
            if loop is not None and stop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(stop.set)
            thread.join(_START_TIMEOUT)
        if self._tls is not None:
            self._tls.cleanup()
            self._tls = None


# --- HTTP -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SinkResponse:
    """What :class:`HttpSink` answers to one request; ``delay`` seconds before answering."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request seen by :class:`HttpSink`, with the status it was answered with.

    ``headers`` has lower-case names; ``body`` is the exact request body.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    sink: HttpSink

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: failed TLS handshakes and dropped clients are expected in tests."""


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do
    timeout = 30
    server: _HttpServer

    def setup(self) -> None:
        self.server.sink._track(self.request, add=True)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.timeout)
            self.request.do_handshake()  # here, not in the accepting thread
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.sink._track(self.request, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence the default stderr access log."""

    def _handle(self) -> None:
        sink = self.server.sink
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            # The client went away in the middle of its body (killed, say): no
            # endpoint acts on half a request, so nothing is recorded or answered.
            self.close_connection = True
            return
        response = sink._next_response()
        sink._record(
            ReceivedRequest(
                method=self.command,
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                status=response.status,
            )
        )
        if response.delay and sink._closing.wait(response.delay):
            self.close_connection = True
            return
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if response.body:
            self.wfile.write(response.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


class HttpSink(Service):
    """A real HTTP(S) server on 127.0.0.1 (a free port) that records every request.

    :param responses: answers in order, each an int status or a :class:`SinkResponse`;
        once used up, every further request gets ``default``.
    :param default: the answer after ``responses`` (200, empty body).
    :param tls: serve HTTPS with a trustme certificate; trust ``ca_file`` to connect.

    Attributes while running: ``url`` (``http[s]://127.0.0.1:PORT/``), ``port``,
    ``ca_file`` and ``requests`` (a snapshot list of :class:`ReceivedRequest`).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        responses: Iterable[int | SinkResponse] = (),
        *,
        default: int | SinkResponse = 200,
        tls: bool = False,
    ) -> None:
        self._responses: list[SinkResponse] = [_as_response(r) for r in responses]
        self.default = _as_response(default)
        self.tls = tls
        self.port = 0
        self.ca_file: Path | None = None
        self._requests: list[ReceivedRequest] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._tls: _Tls | None = None

    @property
    def url(self) -> str:
        """Base URL of the running server, ending in ``/``."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}/"

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def add_responses(self, responses: Sequence[int | SinkResponse]) -> None:
        """Queue more answers after the ones not used yet."""
        with self._lock:
            self._responses.extend(_as_response(r) for r in responses)

    def _next_response(self) -> SinkResponse:
        with self._lock:
            return self._responses.pop(0) if self._responses else self.default

    def _record(self, request: ReceivedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def start(self) -> None:
        """Bind, start the serving thread and return once it accepts (idempotent)."""
        if self._thread is not None:
            return
        self._closing.clear()
        server = _HttpServer((self.host, 0), _HttpHandler)
        server.sink = self
        if self.tls:
            self._tls = _Tls()
            self.ca_file = self._tls.ca_file
            server.socket = self._tls.server_context().wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="http-sink",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, drop open keep-alive connections and delete the CA file."""
        self._closing.set()
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        if server is not None:
            server.shutdown()
            with self._lock:
                connections = list(self._connections)
            for conn in connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            server.server_close()
        if thread is not None:
            thread.join(_START_TIMEOUT)
        if self._tls is not None:
            self._tls.cleanup()
            self._tls = None


def _as_response(value: int | SinkResponse) -> SinkResponse:
    return value if isinstance(value, SinkResponse) else SinkResponse(status=value)
