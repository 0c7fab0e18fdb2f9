"""The asyncio POP3 driver: the only code that touches sockets and TLS.

It feeds :class:`~.protocol.Pop3Connection` and translates every failure in one place:
``TimeoutError`` → :class:`SourceTimeoutError` naming the phase and host, ``OSError``/EOF →
:class:`SourceConnectionError`, ``-ERR`` → the typed errors of :func:`.auth.classify`.

Pipelining (RFC 2449 §6.6, conformance P-06/P-07): :meth:`Pop3Client.stream` keeps at
most ``window`` commands (DELEs aside: one-line replies, bounded by the bytes alone) and
4 KiB of unanswered command bytes in flight. Writes go to the
transport's buffer, which the event loop flushes whenever the socket is writable, and the
4 KiB bound keeps that buffer below its high-water mark, so ``drain()`` never waits while
the server is busy sending a large RETR: reading and writing never block each other.

Timeouts (C-13, T-45): every read has an inactivity timeout, and each RETR reply also has
an overall deadline, max(``retr``, LIST size / ``retr_rate``), counted while waiting for
its bytes, so a server trickling one byte per read cannot hold a session forever.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from mailpipe.errors import (
    AuthenticationError,
    CommitError,
    OversizeError,
    SourceConnectionError,
    SourceError,
    SourcePermanentError,
    SourceTimeoutError,
)
from mailpipe.tls import (
    keep_session,
    make_ssl_context,
    open_stream,
    phase_timeout,
    secure,
)

from . import auth as sasl
from .events import (
    Apop,
    Auth,
    AuthResponse,
    BodyChunk,
    BodyEnd,
    BodyStart,
    Capa,
    Capabilities,
    Command,
    ConnectionClosed,
    Continuation,
    Dele,
    Err,
    Event,
    Greeting,
    MultiLine,
    Ok,
    Pass,
    Quit,
    Retr,
    Stls,
    User,
    parse_capa,
)
from .flight import Flight
from .protocol import BodyTooLargeError, NeedData, Pop3Connection, RemoteProtocolError

log = structlog.get_logger()

#: P-06: unanswered command bytes in flight stay below the smallest send buffer.
MAX_UNANSWERED_BYTES: Final = 4096
DEFAULT_CHUNK: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds per phase (C-13, S-06): TCP connect, TLS handshake, greeting, each read.

    ``retr`` and ``retr_rate`` (octets per second) make the overall RETR deadline of
    T-45: :meth:`retr_budget`.
    """

    connect: float = 30.0
    tls: float = 30.0
    greeting: float = 60.0
    read: float = 120.0
    retr: float = 600.0
    retr_rate: float = 50_000.0

    def retr_budget(self, size: int) -> float:
        """T-45: max(``retr``, LIST size / ``retr_rate``) seconds for one RETR reply."""
        return max(self.retr, size / self.retr_rate)


@dataclass(slots=True)
class _Deadline:
    """T-45: the time one reply may spend waiting for the server's bytes.

    Only time blocked in reads is counted, so the time the caller spends on earlier
    messages while this reply is queued behind them does not use it up.
    """

    phase: str
    total: float
    left: float
    detail: str = ""


class CommandRefused(SourceError):
    """A ``-ERR`` to a command outside authentication; ``.reply`` is the Err event."""

    def __init__(self, message: str, reply: Err) -> None:
        super().__init__(message)
        self.reply = reply


def _limit_of(command: Command, limits: Mapping[int, int] | None) -> int | None:
    if limits is None or not isinstance(command, Retr):
        return None
    return limits.get(command.number)


class Pop3Client:
    """One connection to a POP3 server; see the module docstring.

    ``security`` is ``"tls"`` (implicit TLS), ``"starttls"`` or ``"none"``.
    ``allow_plaintext_password`` must be true for any credential to cross a connection
    without TLS (S-01). ``pipelining`` is ``"auto"`` (on when the latest CAPA lists
    PIPELINING, P-01) or ``"off"``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        security: str = "tls",
        ssl_context: ssl.SSLContext | None = None,
        cert_sha256: str | None = None,
        timeouts: Timeouts | None = None,
        allow_plaintext_password: bool = False,
        pipelining: str = "auto",
        window: int = 32,
        max_line: int = 8192,
        max_message: int = 2 * 2**30,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        self.host = host
        self.port = port
        self.security = security
        self.ssl_context = ssl_context
        self.cert_sha256 = (cert_sha256 or "").replace(":", "").lower() or None
        self.timeouts = timeouts or Timeouts()
        self.allow_plaintext_password = allow_plaintext_password
        self.pipelining_mode = pipelining
        self.window = max(1, window)
        self.chunk_size = chunk_size
        self.conn = Pop3Connection(max_line=max_line, max_message=max_message)
        self.greeting: Greeting | None = None
        self.capabilities: Capabilities | None = None
        self.tls_active = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._log = log.bind(host=host, port=port)

    @property
    def where(self) -> str:
        """``host:port`` for error messages."""
        return f"{self.host}:{self.port}"

    # --- connecting ---------------------------------------------------------------

    async def connect(self) -> Greeting:
        """Open TCP, do the implicit TLS handshake if configured, read the greeting.

        Raises:
            SourceTimeoutError, SourceConnectionError: naming the phase and the host.
            SourceBusyError, SourcePermanentError: a ``-ERR`` greeting (C-14).
        """
        self._reader, self._writer = await open_stream(
            self.host, self.port, timeout=self.timeouts.connect, limit=self.chunk_size
        )
        if self.security == "tls":
            await self._handshake()
        try:
            event = await self._event("greeting", self.timeouts.greeting)
        except SourceTimeoutError as exc:
            if self.security != "tls" and self.port == 995:
                raise SourceTimeoutError(f"{exc} (port 995 expects implicit TLS)") from None
            raise
        if isinstance(event, Err):
            raise sasl.classify(
                event, host=self.where, during="greeting", authenticating=False
            )
        if not isinstance(event, Greeting):
            raise SourceConnectionError(f"{self.where} closed before its greeting")
        self.greeting = event
        self._log.debug("pop3_connected", tls=self.tls_active)
        return event

    async def _handshake(self) -> None:
        assert self._writer is not None
        await secure(
            self._writer,
            self.ssl_context,
            host=self.host,
            port=self.port,
            timeout=self.timeouts.tls,
            cert_sha256=self.cert_sha256,
            protocol="POP3",
        )
        self.tls_active = True

    async def capa(self) -> Capabilities | None:
        """Send CAPA; None on ``-ERR`` (RFC 2449 §5: no extension data, C-24)."""
        return self._capa_reply(await self._roundtrip(Capa()))

    async def capa_with(self, commands: Sequence[Command]) -> list[Event]:
        """CAPA with ``commands`` queued behind it in the same write (P-05): the
        capabilities come from its reply, as after :meth:`capa`; returns the other
        commands' replies (Ok/Err/MultiLine) in order.

        Only while pipelining is active (the most recent CAPA lists PIPELINING, P-01)
        and only for commands of the TRANSACTION state: the caller uses it after login,
        where PIPELINING, announced before login, still holds (RFC 2449 §5: a
        capability of the AUTHORIZATION state is announced in both states).
        """
        if not self.conn.pipelining:
            raise SourceError("capa_with() needs pipelining (P-01)")
        replies: list[Event] = []
        capa = True
        async for event in self.stream([Capa(), *commands]):
            if isinstance(event, BodyStart | BodyChunk | BodyEnd):
                raise SourceConnectionError("streaming commands go through stream()")
            if capa:
                # The capabilities count from their reply on, not once the commands
                # behind it were answered: a caller whose wait for those fails can
                # tell whether the server still lists PIPELINING.
                capa = False
                self._capa_reply(event)
            else:
                replies.append(event)
        return replies

    def _capa_reply(self, event: Event) -> Capabilities | None:
        if isinstance(event, MultiLine):
            self.capabilities = parse_capa(event.body)
        else:
            self.capabilities = None
        self.conn.pipelining = self.pipelining_active
        return self.capabilities

    @property
    def pipelining_active(self) -> bool:
        """P-01: pipelining only on evidence from the most recent CAPA."""
        return (
            self.pipelining_mode == "auto"
            and self.capabilities is not None
            and "PIPELINING" in self.capabilities
        )

    async def starttls(self) -> None:
        """STLS then the handshake (RFC 2595 §4); any refusal is an error, never a
        plaintext fallback (S-03). Capabilities are discarded (C-25, S-04)."""
        event = await self._roundtrip(Stls())
        if not isinstance(event, Ok):
            text = event.text if isinstance(event, Err) else ""
            raise SourcePermanentError(
                f"{self.where} refused STLS ({text}); security = 'starttls' requires it"
            )
        await self._handshake()
        self.conn.start_tls_done()
        self.capabilities = None
        self.conn.pipelining = False
        self.greeting = None if self.greeting is None else Greeting(
            text=self.greeting.text  # S-04: the pre-TLS APOP timestamp is untrusted
        )

    # --- authentication -----------------------------------------------------------

    def _check_plaintext(self) -> None:
        if not self.tls_active and not self.allow_plaintext_password:
            # S-01, RFC 2595 §2.3: no credential over a connection without TLS.
            raise SourcePermanentError(
                f"refusing to send credentials to {self.where} without TLS "
                "(set allow_plaintext_password = true to allow it)"
            )

    async def login_user(self, user: str, password: str) -> None:
        """USER then PASS (RFC 1939 §7); PASS only after ``+OK`` to USER (C-17)."""
        self._check_plaintext()
        event = await self._roundtrip(User(name=user))
        if isinstance(event, Err):
            raise self._auth_error(event, "USER")
        event = await self._roundtrip(Pass(password=password))
        if isinstance(event, Err):
            raise self._auth_error(event, "PASS")

    async def login_apop(self, user: str, password: str) -> None:
        """APOP with the greeting's validated timestamp (RFC 1939 §7, C-15, C-16)."""
        self._check_plaintext()
        stamp = self.greeting.apop_timestamp if self.greeting else None
        if stamp is None:
            raise SourcePermanentError(f"{self.where} offers no APOP timestamp")
        digest = sasl.apop_digest(stamp, password)
        event = await self._roundtrip(Apop(name=user, digest=digest))
        if isinstance(event, Err):
            raise self._auth_error(event, "APOP")

    async def login_sasl(self, mechanism: sasl.Mechanism) -> None:
        """One SASL exchange (RFC 5034 §4); XOAUTH2 always two-line (C-43).

        A mechanism that finds the server's part wrong (SCRAM nonce or signature) makes
        the exchange cancel with ``*`` and fail with AuthenticationError, whatever the
        server answers; so does ``+OK`` before the server proved itself.
        """
        self._check_plaintext()
        name = mechanism.name
        advertised = self.capabilities is not None and name in self.capabilities.sasl
        command = Auth(mechanism=name)
        initial = mechanism.initial()
        # T-37: XOAUTH2 never one-line (Microsoft closes the connection on it).
        if initial is not None and advertised and name != "XOAUTH2":
            encoded = sasl.b64encode(initial)
            if sasl.initial_response_fits(name, encoded):  # C-37
                command = Auth(mechanism=name, initial_response=encoded)
                mechanism.initial_sent()
        event = await self._roundtrip(command)
        failure: str | None = None
        for _ in range(16):  # every loop bounded
            if isinstance(event, Ok) and failure is None:
                try:
                    mechanism.success()
                except sasl.SaslVerifyError as exc:
                    failure = str(exc)
                else:
                    return
            if failure is not None and isinstance(event, Ok | Err):
                raise self._verify_error(name, failure)
            if isinstance(event, Err):
                token = getattr(mechanism, "token", "")
                raise self._auth_error(
                    event, f"AUTH {name}", mechanism.error, len(token) if token else None
                )
            if not isinstance(event, Continuation):
                raise SourceConnectionError(f"{self.where}: unexpected {event!r} in AUTH")
            challenge = sasl.b64decode_strict(event.text)
            try:
                response = sasl.b64encode(mechanism.respond(challenge))
            except sasl.SaslVerifyError as exc:
                failure, response = str(exc), "*"
            except sasl.SaslCancel:
                response = "*"  # C-39: cancel; the server MUST answer -ERR
            self._write(self.conn.send(AuthResponse(data=response)))
            event = await self._event("read", self.timeouts.read)
        raise SourceConnectionError(f"{self.where}: endless SASL {name} exchange")

    def _verify_error(self, name: str, reason: str) -> AuthenticationError:
        # RFC 5802 §5.1: the client MUST verify the server; failing that, it fails.
        error = AuthenticationError(f"{self.where}: AUTH {name} failed: {reason}")
        self._log.warning("pop3_auth_server_unverified", mechanism=name, error=reason)
        return error

    def _auth_error(
        self,
        event: Err,
        during: str,
        oauth: dict[str, str] | None = None,
        token_length: int | None = None,
    ) -> SourceError:
        error = sasl.classify(
            event, host=self.where, during=during, capabilities=self.capabilities
        )
        if oauth and isinstance(error, AuthenticationError):
            details = ", ".join(f"{k}={v}" for k, v in sorted(oauth.items()))
            error = AuthenticationError(f"{error} (OAuth error: {details})")
        if token_length is not None and isinstance(error, AuthenticationError):
            # T-38: Microsoft refuses tokens over ~4 KiB with a bare "Protocol error".
            error = AuthenticationError(f"{error} (OAuth token length {token_length})")
        self._log.warning("pop3_auth_refused", during=during, error=str(error))
        return error

    # --- commands -----------------------------------------------------------------

    async def command(self, command: Command) -> Ok | MultiLine:
        """Send one command and return its reply; ``-ERR`` raises CommandRefused."""
        event = await self._roundtrip(command)
        if isinstance(event, Err):
            raise CommandRefused(
                f"{self.where}: {command.describe()} refused: {event.text[:200]}", event
            )
        if not isinstance(event, Ok | MultiLine):
            raise SourceConnectionError(f"{self.where}: unexpected reply {event!r}")
        return event

    async def _roundtrip(self, command: Command) -> Event:
        self._write(self.conn.send(command))
        event = await self._event("read", self.timeouts.read)
        if isinstance(event, BodyStart):
            raise SourceConnectionError("streaming commands go through stream()")
        return event

    async def stream(
        self,
        commands: Iterable[Command],
        *,
        sizes: Mapping[int, int] | None = None,
        limits: Mapping[int, int] | None = None,
    ) -> AsyncIterator[Event]:
        """Send ``commands`` (pipelined when active, else one at a time) and yield each
        reply event in order: Ok/Err/MultiLine, or BodyStart, BodyChunk..., BodyEnd.

        ``commands`` is read lazily, at each refill of the window, and asked again at
        the next refill after it ran dry: an iterator that grows while the stream runs
        (:class:`.flight.Flight`, P-14) has what it gained sent in the same stream; DELEs
        a Flight gained are written after the next event read (reply or body chunk),
        within the bounds, without waiting for the window to drain. The stream
        ends when every command sent was answered and it had nothing more.

        Each RETR reply also has an overall deadline (T-45), from its LIST size in
        ``sizes`` (message number → octets; unknown counts as 0): see
        :meth:`Timeouts.retr_budget`. It raises SourceTimeoutError naming
        ``retr deadline`` and the host, separately from the per-read timeout.

        ``limits`` (message number → octets) caps what a RETR body may hold, whatever
        LIST said: the chunk that would pass it is never yielded, the connection is
        closed (no QUIT: nothing is deleted) and :class:`mailpipe.OversizeError` is
        raised. The ``max_message`` cap of every body raises it too, with ``hard``.
        """
        source = iter(commands)
        flight = source if isinstance(source, Flight) else None
        piped = self.conn.pipelining
        window = self.window if piped else 1
        inflight: deque[tuple[Command, int, bool]] = deque()  # command, octets, counted
        unanswered = 0
        counted = 0  # commands in flight that count towards the window

        def fill() -> None:
            # ``source`` is asked again at every refill, even after it had nothing:
            # a growing one (a Flight, P-14) gets what was added meanwhile sent.
            nonlocal unanswered, counted
            out: list[bytes] = []
            if flight is not None:
                flight.added = False
            while unanswered < MAX_UNANSWERED_BYTES:
                # P-06: a pipelined DELE (a one-line reply) counts towards the 4 KiB
                # bound only, so a group's DELEs never hold back the RETR window.
                if counted >= window and not (
                    piped and flight is not None and flight.dele_next
                ):
                    break
                cmd = next(source, None)
                if cmd is None:
                    break
                counts = not (piped and isinstance(cmd, Dele))
                wire = self.conn.send(cmd)
                out.append(wire)
                inflight.append((cmd, len(wire), counts))
                unanswered += len(wire)
                counted += counts
            if out:
                self._write(b"".join(out))

        fill()
        deadline: _Deadline | None = None
        head_done = True
        limit: int | None = None
        received = 0
        while inflight:
            if head_done:  # the next reply is now the one being read
                deadline = self._retr_deadline(inflight[0][0], sizes or {})
                limit = _limit_of(inflight[0][0], limits)
                received = 0
                head_done = False
            try:
                event = await self._event("read", self.timeouts.read, deadline)
            except BodyTooLargeError as exc:
                await self.abort()
                raise self._oversize(inflight[0][0], exc.limit, exc.octets, True) from None
            if isinstance(event, BodyChunk) and limit is not None:
                received += len(event.data)
                if received > limit:
                    # Issue 20.6: the policy holds for the octets received, not LIST.
                    await self.abort()
                    raise self._oversize(inflight[0][0], limit, received, False)
            yield event
            if isinstance(event, Ok | Err | MultiLine | BodyEnd):
                _, octets, counts = inflight.popleft()
                unanswered -= octets
                counted -= counts
                head_done = True
                # Refill once an eighth of the window and half the byte bound
                # drained: the window stays at least 7/8 full (unless a byte bound
                # holds it back), so the replies to the next RETRs are on their way
                # while the client works through the
                # ones already in (refilled at half, 64 of 128 small messages took
                # about one 20 ms round trip to process, and the stream stalled at
                # each refill); a run of DELEs, bound by bytes only (P-06), is still
                # written in batches of 2 KiB, not one DELE per reply.
                if (
                    counted <= window - max(1, window // 8)
                    and unanswered <= MAX_UNANSWERED_BYTES // 2
                ):
                    fill()
                    continue
            if flight is not None and flight.added:
                # P-14: DELEs acknowledged while the stream runs go out now, as far
                # as the bounds allow, not once the window drained: the last
                # group's DELEs would otherwise wait for the replies to the earlier
                # ones, a round trip before QUIT.
                fill()

    def _oversize(
        self, command: Command, limit: int, received: int, hard: bool
    ) -> OversizeError:
        number = getattr(command, "number", 0) or 0
        what = "the max_message cap" if hard else "the size limit"
        self._log.warning(
            "pop3_message_oversize", number=number, limit=limit, received=received,
            hard=hard,
        )
        return OversizeError(
            f"{self.where}: {command.describe()} sent more than {limit} octets "
            f"({what}); transfer stopped, connection closed",
            number=number, limit=limit, received=received, hard=hard,
        )

    def _retr_deadline(
        self, command: Command, sizes: Mapping[int, int]
    ) -> _Deadline | None:
        if not isinstance(command, Retr):
            return None
        size = sizes.get(command.number, 0)
        budget = self.timeouts.retr_budget(size)
        detail = f"RETR {command.number}, {size} octets listed"
        return _Deadline("retr deadline", budget, budget, detail)

    async def quit(self) -> None:
        """QUIT: in TRANSACTION the server now deletes what was marked (RFC 1939 §6).

        Raises:
            CommitError: ``-ERR`` (C-57) or the reply was lost (T-42).
        """
        try:
            event = await self._roundtrip(Quit())
        except (SourceConnectionError, SourceTimeoutError, RemoteProtocolError) as exc:
            await self.abort()
            raise CommitError(
                f"{self.where}: QUIT reply lost ({exc}); deletion state unknown"
            ) from None
        if isinstance(event, Err):
            await self.abort()
            raise CommitError(f"{self.where}: QUIT refused: {event.text[:200]}")
        await self._close()

    async def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        keep_session(writer)  # the next session to this server resumes TLS (issue 18)
        try:
            writer.close()  # C-35: after the QUIT reply; TLS sends close_notify here
            async with asyncio.timeout(2):
                await writer.wait_closed()
        except (OSError, TimeoutError, ssl.SSLError):
            writer.transport.abort()

    async def abort(self) -> None:
        """Close without QUIT, so the server deletes nothing (RFC 1939 §6). Never raises."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.transport.abort()
            except Exception as exc:  # abort must never raise
                self._log.debug("pop3_abort_failed", error=type(exc).__name__)

    # --- I/O ----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._writer is None:
            raise SourceConnectionError(f"{self.where}: connection already closed")
        self._writer.write(data)

    async def _event(
        self, phase: str, timeout: float, deadline: _Deadline | None = None
    ) -> Event:
        conn = self.conn
        for _ in range(1 << 62):
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                if exc.truncated:
                    raise SourceConnectionError(f"{self.where}: {exc}") from None
                raise
            if conn.warnings:
                for warning in conn.warnings:
                    self._log.warning("pop3_protocol_oddity", detail=warning[:200])
                conn.warnings.clear()
            if not isinstance(event, NeedData):
                if isinstance(event, ConnectionClosed) and phase == "greeting":
                    raise SourceConnectionError(f"{self.where} closed before its greeting")
                return event
            conn.receive_data(await self._read(phase, timeout, deadline))
        raise AssertionError("unreachable")

    async def _read(
        self, phase: str, timeout: float, deadline: _Deadline | None = None
    ) -> bytes:
        if self._reader is None or self._writer is None:
            raise SourceConnectionError(f"{self.where}: connection already closed")
        limit, by_deadline = timeout, False
        if deadline is not None:
            if deadline.left <= 0:
                raise self._deadline_error(deadline)
            by_deadline = deadline.left < timeout
            limit = min(timeout, deadline.left)
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            async with asyncio.timeout(limit):
                return await self._reader.read(self.chunk_size)
        except TimeoutError:
            if deadline is not None and by_deadline:
                raise self._deadline_error(deadline) from None
            raise self._timeout(phase, timeout) from None  # C-13: inactivity
        except (OSError, ssl.SSLError) as exc:
            awaited = self.conn.awaited
            if awaited is not None:  # e.g. RST or EPIPE once the server process died
                raise SourceConnectionError(
                    f"{self.where}: connection lost during {awaited.describe()} ({exc})"
                ) from None
            raise SourceConnectionError(f"{self.where}: {phase} failed: {exc}") from None
        finally:
            if deadline is not None:
                deadline.left -= loop.time() - start

    def _deadline_error(self, deadline: _Deadline) -> SourceTimeoutError:
        # T-45: a server trickling bytes never trips the per-read timer; this does.
        return self._timeout(deadline.phase, deadline.total, deadline.detail)

    def _timeout(
        self, phase: str, seconds: float, detail: str = ""
    ) -> SourceTimeoutError:
        return phase_timeout(phase, seconds, self.where, detail)


__all__ = [
    "BodyChunk",
    "BodyEnd",
    "BodyStart",
    "CommandRefused",
    "Pop3Client",
    "Timeouts",
    "make_ssl_context",
]
