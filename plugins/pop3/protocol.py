"""The POP3 client protocol as a sans-I/O state machine: bytes in, events out.

Theory of operation
-------------------
This module contains no networking code at all (no socket, asyncio or ssl import; a test
checks). :class:`Pop3Connection` has three verbs, as h11 does:

* ``send(command) -> bytes`` validates the command against the current state and the
  transition table below, queues it as outstanding and returns the bytes to write.
* ``receive_data(data)`` appends what the socket produced; ``b""`` means EOF.
* ``next_event()`` returns the next reply event, or :data:`NEED_DATA`.

Rule 1: everything that moves the state lives in this file, and the state moves on the
*reply* (``Pass`` + ``+OK`` → TRANSACTION; ``-ERR`` stays in AUTHORIZATION). The one
exception is QUIT in TRANSACTION, which enters UPDATE when sent (RFC 1939 §6) so nothing
else can follow it.

Replies are matched to outstanding commands strictly in order (RFC 2449 §6.6, P-02). More
than one command may be outstanding only when the driver set ``pipelining`` (after CAPA
advertised PIPELINING) and only in TRANSACTION (P-03, P-05). STLS, AUTH, APOP, USER,
PASS and QUIT always go alone.

Framing (RFC 1939 §3; conformance §0.2, C-07, C-08): a multi-line body ends at
``CRLF.CRLF`` and a leading dot is removed from every other line that starts with one.
*Only* CRLF ends a line inside a body: a bare LF or CR is data. Bodies of RETR and TOP are
streamed as :class:`BodyChunk` events, so memory is bounded by what the driver feeds per
call, never by a line or a message; a body larger than ``max_message`` is an error. Status
lines accept an optional CR before LF and are capped at ``max_line`` octets. A greeting
that ends in a bare LF switches this one session to LF framing (T-08).

Errors are split by blame: :class:`LocalProtocolError` (we tried something POP3 forbids
here) and :class:`RemoteProtocolError` (the server broke the protocol or a limit). After
either, the state is ERROR for good; the only way on is a new connection.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Any, Final

from mailpipe.errors import SourceError

from .events import (
    Apop,
    Auth,
    AuthResponse,
    BodyChunk,
    BodyEnd,
    BodyStart,
    Capa,
    Command,
    ConnectionClosed,
    Continuation,
    Dele,
    Err,
    Event,
    Greeting,
    List,
    MultiLine,
    Noop,
    Ok,
    Pass,
    Quit,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
    Utf8,
    apop_timestamp,
    split_code,
)


class Pop3ProtocolError(SourceError):
    """Abstract: the POP3 conversation broke; the connection is unusable (h11 style)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Pop3ProtocolError:
        if cls is Pop3ProtocolError:
            raise TypeError("Pop3ProtocolError is abstract; raise a subclass")
        return super().__new__(cls, *args, **kwargs)


class LocalProtocolError(Pop3ProtocolError):
    """We attempted something POP3 forbids in this state; a bug in the caller."""


class RemoteProtocolError(Pop3ProtocolError):
    """The server broke the protocol or a limit; ``truncated`` when it closed mid-reply."""

    def __init__(self, message: str, *, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated


class BodyTooLargeError(RemoteProtocolError):
    """A RETR/TOP body passed ``max_message``; ``octets`` were seen, ``limit`` allowed."""

    def __init__(self, message: str, *, octets: int, limit: int) -> None:
        super().__init__(message)
        self.octets = octets
        self.limit = limit


class State(Enum):
    """RFC 1939 §3 session states, plus the h11-style terminal ones."""

    GREETING = "GREETING"
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`Pop3Connection.next_event` when more bytes are needed.
NEED_DATA: Final = _NeedData()
NeedData = _NeedData

AUTHORIZATION, TRANSACTION = State.AUTHORIZATION, State.TRANSACTION
UPDATE, CLOSED = State.UPDATE, State.CLOSED

#: (state, command) → state after ``+OK``. Anything missing is a LocalProtocolError.
#: RFC 1939 §4 (AUTHORIZATION), §5 (TRANSACTION), §6 (UPDATE); RFC 2449 §5 (CAPA in both);
#: RFC 2595 §4 (STLS only before auth); RFC 5034 §4 (AUTH only before auth).
TRANSITIONS: Final[dict[tuple[State, type[Command]], State]] = {
    (AUTHORIZATION, Capa): AUTHORIZATION,
    (AUTHORIZATION, Stls): AUTHORIZATION,
    (AUTHORIZATION, User): AUTHORIZATION,
    (AUTHORIZATION, Utf8): AUTHORIZATION,  # MP-02, RFC 6856 §2
    (AUTHORIZATION, Pass): TRANSACTION,
    (AUTHORIZATION, Apop): TRANSACTION,
    (AUTHORIZATION, Auth): TRANSACTION,  # C-41: none in TRANSACTION, so no second AUTH
    (AUTHORIZATION, Quit): CLOSED,  # RFC 1939 §4: no UPDATE from AUTHORIZATION
    (TRANSACTION, Capa): TRANSACTION,
    (TRANSACTION, Stat): TRANSACTION,
    (TRANSACTION, List): TRANSACTION,
    (TRANSACTION, Uidl): TRANSACTION,
    (TRANSACTION, Retr): TRANSACTION,
    (TRANSACTION, Top): TRANSACTION,
    (TRANSACTION, Dele): TRANSACTION,
    (TRANSACTION, Noop): TRANSACTION,
    (TRANSACTION, Rset): TRANSACTION,
    (TRANSACTION, Quit): CLOSED,  # via UPDATE: RFC 1939 §6
}

#: P-05: what may be queued behind other outstanding commands.
PIPELINABLE: Final = frozenset({Stat, List, Uidl, Retr, Top, Dele, Noop, Rset, Capa})

#: S-12: a multi-line listing (CAPA, LIST, UIDL) larger than this is hostile.
DEFAULT_MAX_LISTING: Final = 256 * 2**20
DEFAULT_MAX_LINE: Final = 8192
DEFAULT_MAX_MESSAGE: Final = 2 * 2**30

_READ_STATUS, _READ_BODY, _BODY_DONE = 0, 1, 2


def _text(line: bytes) -> str:
    return line.decode("latin-1")


class Pop3Connection:
    """One POP3 client connection's protocol state; see the module docstring.

    :param max_line: cap on a status line (greeting, ``+OK``/``-ERR``, CAPA line); RFC
        2449 §4 says 512, real servers send more (C-04), so 8 KiB by default.
    :param max_message: cap on one RETR/TOP body in octets (C-11, T-22).
    :param max_listing: cap on a collected CAPA/LIST/UIDL body in octets (S-12).
    """

    def __init__(
        self,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_listing: int = DEFAULT_MAX_LISTING,
    ) -> None:
        self.max_line = max_line
        self.max_message = max_message
        self.max_listing = max_listing
        self.state = State.GREETING
        #: Set by the driver once the latest CAPA listed PIPELINING (P-01).
        self.pipelining = False
        #: Non-fatal oddities (``+OKAY``, long lines, bare-LF server) for the driver to log.
        self.warnings: list[str] = []
        self.greeting: Greeting | None = None
        self._pending: deque[Command] = deque()
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._nl = b"\r\n"
        self._reading = _READ_STATUS
        self._line_start = True
        self._octets = 0
        self._listing = bytearray()
        self._listing_text = ""
        self._listing_code = ""
        self._user_ok = False
        self._sasl_wait = False
        self._await_tls = False
        self._body_end: BodyEnd | None = None

    # --- sending --------------------------------------------------------------------

    @property
    def newline(self) -> bytes:
        """What ends a line inside multi-line replies: CRLF, or LF for a session whose
        greeting ended in a bare LF (T-08)."""
        return self._nl

    @property
    def outstanding(self) -> int:
        """How many commands await their reply."""
        return len(self._pending)

    @property
    def awaited(self) -> Command | None:
        """The command whose reply is read next (None when nothing is outstanding)."""
        return self._pending[0] if self._pending else None

    def send(self, command: Command) -> bytes:
        """Validate ``command``, queue it as outstanding and return the bytes to write.

        Raises:
            LocalProtocolError: the command is not allowed in this state, would be
                pipelined where that is forbidden, or is too long (C-01).
            RemoteProtocolError: data arrived while no command was outstanding (C-59).
            After either, the state is ERROR.
        """
        if not self._pending and self.buffered and self.state is not State.ERROR:
            # C-59: bytes that arrived while nothing was outstanding are unsolicited.
            self.state = State.ERROR
            raw = bytes(self._buf[self._pos : self._pos + 200])
            raise RemoteProtocolError(f"unsolicited data from the server: {raw!r}")
        try:
            return self._send(command)
        except LocalProtocolError:
            self.state = State.ERROR
            raise
        except ValueError as exc:
            self.state = State.ERROR
            raise LocalProtocolError(str(exc)) from None

    def _send(self, command: Command) -> bytes:
        name = command.describe()
        if self.state in (State.ERROR, State.CLOSED, State.GREETING, State.UPDATE):
            raise LocalProtocolError(f"cannot send {name} in state {self.state.value}")
        if self._await_tls:
            # RFC 2595 §4: nothing may be sent until the TLS handshake completed.
            raise LocalProtocolError(f"cannot send {name} before the TLS handshake")
        if type(command) is AuthResponse:
            if not self._sasl_wait:
                raise LocalProtocolError("no SASL challenge is waiting for a response")
            self._sasl_wait = False
            return command.to_bytes()
        if self._sasl_wait:
            raise LocalProtocolError(f"cannot send {name} inside a SASL exchange")
        if (self.state, type(command)) not in TRANSITIONS:
            raise LocalProtocolError(f"{name} is not allowed in state {self.state.value}")
        if self._pending and not (
            self.pipelining
            and self.state is TRANSACTION
            and type(command) in PIPELINABLE
        ):
            raise LocalProtocolError(
                f"{name} cannot be sent while {len(self._pending)} command(s) are "
                "outstanding (no PIPELINING, or a command that must go alone)"
            )
        if type(command) is Pass and not self._user_ok:
            # RFC 1939 §7: PASS only immediately after a successful USER (C-17).
            raise LocalProtocolError("PASS is only valid right after USER got +OK")
        wire = command.to_bytes()
        self._pending.append(command)
        if type(command) is Quit and self.state is TRANSACTION:
            self.state = UPDATE  # RFC 1939 §6
        return wire

    def start_tls_done(self) -> None:
        """Tell the connection that the TLS handshake after STLS completed (RFC 2595 §4)."""
        if not self._await_tls:
            raise LocalProtocolError("no STLS handshake was pending")
        self._await_tls = False

    # --- receiving ------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the server; ``b""`` means the server closed (EOF)."""
        if not data:
            self._eof = True
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Octets received but not yet consumed by :meth:`next_event`."""
        return len(self._buf) - self._pos

    def next_event(self) -> Event | _NeedData:
        """Return the next event, or :data:`NEED_DATA`.

        Returns:
            :class:`Greeting`, :class:`Ok`, :class:`Err`, :class:`Continuation`,
            :class:`MultiLine`, :class:`BodyStart`, :class:`BodyChunk`, :class:`BodyEnd`,
            :class:`ConnectionClosed`, or :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: the server broke framing, a limit or the command/reply
                order, or closed mid-reply (``truncated``). The state becomes ERROR.
        """
        if self.state is State.ERROR:
            raise LocalProtocolError("the connection is in state ERROR")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self.state = State.ERROR
            raise

    def _next_event(self) -> Event | _NeedData:
        if self._reading == _BODY_DONE:
            assert self._body_end is not None
            end, self._body_end = self._body_end, None
            self._reading = _READ_STATUS
            self._pending.popleft()
            return end
        if self._reading == _READ_BODY:
            return self._read_body()
        if self.state is State.GREETING:
            line = self._status_line()
            return NEED_DATA if line is None else self._greeting(line)
        if not self._pending:
            if self.buffered:
                # C-59: a line with no command outstanding (an autologout notice, or
                # the rest of a body a server failed to dot-stuff, T-03): never match it
                # to the next command.
                raw = bytes(self._buf[self._pos : self._pos + 200])
                raise RemoteProtocolError(f"unsolicited data from the server: {raw!r}")
            if self._eof:
                self.state = CLOSED
                return ConnectionClosed()
            return NEED_DATA
        line = self._status_line()
        if line is None:
            return NEED_DATA
        return self._reply(line)

    def _status_line(self) -> bytes | None:
        buf, pos = self._buf, self._pos
        i = buf.find(b"\n", pos, pos + self.max_line + 1)
        if i < 0:
            if len(buf) - pos > self.max_line:
                raise RemoteProtocolError(
                    f"status line too long (over {self.max_line} octets)"
                )
            if self._eof:
                what = self._pending[0].describe() if self._pending else "greeting"
                raise RemoteProtocolError(
                    f"connection lost during {what} (closed before its reply ended)",
                    truncated=True,
                )
            return None
        line = bytes(buf[pos:i])
        self._pos = i + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        elif self.state is State.GREETING:
            self._nl = b"\n"  # T-08: a bare-LF server, for this session only
            self.warnings.append(
                "greeting ended in a bare LF: this session uses LF framing "
                "(multi-line replies end at LF.LF)"
            )
        if len(line) > 510:  # RFC 2449 §4: 512 octets with CRLF
            self.warnings.append(f"status line of {len(line)} octets exceeds RFC 2449's 512")
        return line

    def _greeting(self, line: bytes) -> Event:
        if line.startswith(b"+"):
            text = _text(line[3:].lstrip(b" ")) if line.startswith(b"+OK") else ""
            code, _ = split_code(text)
            self.greeting = Greeting(
                text=text, apop_timestamp=apop_timestamp(line), code=code
            )
            self.state = AUTHORIZATION
            return self.greeting
        if line.startswith(b"-"):
            text = _text(line[4:].lstrip(b" "))
            self.state = CLOSED  # C-14: a refused greeting ends the session
            return Err(command=None, text=text, code=split_code(text)[0])
        raise RemoteProtocolError(_not_pop3(line))

    def _reply(self, line: bytes) -> Event | _NeedData:
        command = self._pending[0]
        head = line[:1]
        if head == b"+":
            is_ok = line.startswith(b"+OK") and (len(line) == 3 or line[3:4] == b" ")
            if type(command) is Auth and not is_ok:
                if line == b"+" or line.startswith(b"+ "):
                    # RFC 5034 §4 continue-req; a bare "+" is tolerated (C-40, T-35).
                    self._sasl_wait = True
                    return Continuation(text=_text(line[2:]))
                raise RemoteProtocolError(f"malformed SASL continuation {line[:80]!r}")
            if not is_ok:
                self.warnings.append(f"non-standard positive status {line[:20]!r}")
            text = _text(line[3:].lstrip(b" ")) if line.startswith(b"+OK") else ""
            return self._ok(command, text)
        if head == b"-":
            text = _text(line[4:].lstrip(b" ")) if line.startswith(b"-ERR") else ""
            self._pending.popleft()
            self._after_err(command)
            return Err(command=command, text=text, code=split_code(text)[0])
        # P-02: a line that cannot belong to the head command means desync.
        raise RemoteProtocolError(
            f"expected +OK or -ERR for {command.describe()}, got {line[:80]!r}"
            + (f" ({_not_pop3(line)})" if line[:1] in (b"*", b"\x16") else "")
        )

    def _ok(self, command: Command, text: str) -> Event | _NeedData:
        code = split_code(text)[0]
        if command.multiline:
            self._reading = _READ_BODY
            self._line_start = True
            self._octets = 0
            if command.streams:
                return BodyStart(command=command, text=text)
            self._listing = bytearray()
            self._listing_text, self._listing_code = text, code
            return self._read_body()
        self._pending.popleft()
        kind = type(command)
        if kind is User:
            self._user_ok = True
        elif kind is Stls:
            if self.buffered:
                # S-05 / T-41: bytes after the STLS reply were injected in plaintext.
                raise RemoteProtocolError(
                    "data received after the STLS reply (possible injection)"
                )
            self._await_tls = True
        if self.state is UPDATE:
            self.state = CLOSED  # RFC 1939 §6: +OK to QUIT, the server committed
        else:
            self.state = TRANSITIONS[(self.state, kind)]
        if kind is not User:
            self._user_ok = False
        return Ok(command=command, text=text, code=code)

    def _after_err(self, command: Command) -> None:
        self._user_ok = False
        self._sasl_wait = False
        if type(command) is Quit:
            self.state = CLOSED  # C-57: -ERR to QUIT; the session is over anyway

    def _read_body(self) -> Event | _NeedData:
        buf, pos, nl = self._buf, self._pos, self._nl
        n = len(nl)
        sep = nl + b"."
        parts: list[bytes | bytearray] = []
        ended = False
        while True:
            if self._line_start:
                avail = len(buf) - pos
                if avail == 0:
                    break
                if buf[pos] == 0x2E:  # "."
                    if avail < 1 + n:
                        if bytes(buf[pos + 1 :]) == nl[: avail - 1]:
                            break  # may be the terminator: wait for more
                        pos += 1  # RFC 1939 §3: remove the stuffed dot
                    elif buf[pos + 1 : pos + 1 + n] == nl:
                        pos += 1 + n  # RFC 1939 §3: ".CRLF" ends the response
                        ended = True
                        break
                    else:
                        pos += 1  # RFC 1939 §3: remove the stuffed dot
                self._line_start = False
            i = buf.find(sep, pos)
            if i >= 0:
                parts.append(buf[pos : i + n])
                pos = i + n
                self._line_start = True
                continue
            end = len(buf)
            if end - pos >= n and buf[end - n : end] == nl:
                self._line_start = True
            elif n == 2 and end > pos and buf[end - 1] == 0x0D:
                end -= 1  # a CR that may start the next CRLF
            if end > pos:
                parts.append(buf[pos:end])
            pos = end
            break
        self._pos = pos
        data = b"".join(parts)
        self._octets += len(data)
        command = self._pending[0]
        if not command.streams:
            self._listing += data
            if len(self._listing) > self.max_listing:
                raise RemoteProtocolError(
                    f"{command.describe()} listing exceeds {self.max_listing} octets"
                )
            if not ended:
                return self._need_more(command)
            self._reading = _READ_STATUS
            self._pending.popleft()
            body, self._listing = bytes(self._listing), bytearray()
            return MultiLine(
                command=command,
                text=self._listing_text,
                body=body,
                code=self._listing_code,
                newline=self._nl,
            )
        if self._octets > self.max_message:
            raise BodyTooLargeError(
                f"{command.describe()} body exceeds the {self.max_message}-octet cap",
                octets=self._octets,
                limit=self.max_message,
            )
        if ended:
            end_event = BodyEnd(command=command, octets=self._octets)
            if not data:
                self._reading = _READ_STATUS
                self._pending.popleft()
                return end_event
            self._body_end = end_event
            self._reading = _BODY_DONE
            return BodyChunk(data)
        if data:
            return BodyChunk(data)
        return self._need_more(command)

    def _need_more(self, command: Command) -> _NeedData:
        if self._eof:
            # C-12 / T-28: EOF before the terminator is a failed transfer.
            raise RemoteProtocolError(
                f"connection lost during {command.describe()} (closed mid-reply)",
                truncated=True,
            )
        return NEED_DATA


def _not_pop3(line: bytes) -> str:
    # C-03: name the protocol the peer seems to speak.
    if line.startswith(b"* OK") or line.startswith(b"* PREAUTH"):
        return "the server speaks IMAP, not POP3"
    if line[:3].isdigit():
        return "the server speaks SMTP (or FTP), not POP3"
    if line.startswith(b"\x16\x03"):
        return "the server sent a TLS record: use implicit TLS (security = 'tls')"
    return f"not a POP3 greeting: {line[:80]!r}"
