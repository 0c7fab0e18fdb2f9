"""The IMAP4 client protocol as a sans-I/O state machine (no sockets, no asyncio).

Theory of operation (h11 style)::

    conn = ImapConnection()
    wire = conn.send(commands.capability())  # validates, tags, returns bytes to write
    conn.receive_data(chunk)                 # b"" means EOF
    event = conn.next_event()                # an event, or NEED_DATA
    out = conn.data_to_send()                # literal octets released by a "+"

Receiving is a push parser over a byte buffer. A response is lines plus counted
literals (IC-01): when a line ends in ``{n}`` exactly n octets follow and the response
continues after them. Literals that carry a FETCH body section (``BODY[]``,
``BODY[HEADER]``, ``RFC822``, ``BINARY[]``) are never held: they come out as
:class:`LiteralStart`, :class:`LiteralChunk`... :class:`LiteralEnd` as the bytes arrive
(IC-31) and the finished FETCH carries a :class:`Literal` placeholder in their place.
Other literals (a mailbox name, an ENVELOPE field) are kept inline up to
``max_inline_literal``. Non-literal bytes of one response are capped at
``max_response`` (IC-10), so a server that never sends CRLF cannot fill memory.
Results do not depend on how the bytes are split (IC-10).

Sending: every command gets a fresh tag ``A<n>`` (IC-03). String arguments go out
quoted when 7-bit printable, otherwise as literals (IC-06): non-synchronizing
``{n+}`` when the current capabilities allow it (IC-08: LITERAL+ for any size,
LITERAL- up to 4096 octets), else synchronizing ``{n}`` whose octets are released
only after the server's ``+`` (IC-07); a tagged NO/BAD instead of ``+`` drops them.

Capabilities belong to a phase (IC-12): the list is taken from CAPABILITY data or a
``[CAPABILITY ...]`` code, and forgotten when STARTTLS or authentication succeeds
unless that very completion (or data during it) carried a new list.

States (IC-13): NOT_AUTHENTICATED, AUTHENTICATED, SELECTED, LOGOUT; ERROR after any
protocol error, for good. The state moves on the tagged completion. A tag that is
not outstanding, or a ``+`` nobody waits for, is a :class:`RemoteProtocolError`
(IC-02).
"""

from __future__ import annotations

import base64
import enum
import itertools
import re
from collections import deque
from typing import Any, Final

from mailpipe.errors import SourceError

from .events import (
    Atom,
    Closed,
    Command,
    Continuation,
    Data,
    Done,
    Event,
    Greeting,
    Literal,
    LiteralChunk,
    LiteralEnd,
    LiteralStart,
    ResponseCode,
    Status,
    String,
    Value,
    capability_names,
    parse_number,
)


class ImapProtocolError(SourceError):
    """Abstract: the IMAP conversation broke; the connection is unusable (h11 style)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> ImapProtocolError:
        if cls is ImapProtocolError:
            raise TypeError("ImapProtocolError is abstract; raise a subclass")
        return super().__new__(cls, *args, **kwargs)


class LocalProtocolError(ImapProtocolError):
    """We attempted something IMAP forbids in this state; a bug in the caller."""


class RemoteProtocolError(ImapProtocolError):
    """The server broke the protocol or a limit; the session is unusable."""


class ClosedMidResponse(RemoteProtocolError):
    """The connection ended inside a response (a literal cut short): a connection
    failure as much as a protocol one; the driver reports it as a connection error."""


class State(enum.Enum):
    """Connection states of RFC 9051 §3, plus ERROR."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"
    ERROR = "error"


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`ImapConnection.next_event` when more bytes are needed.
NEED_DATA: Final = NeedData()

_ANY: Final = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "ID"})
_NOT_AUTH: Final = frozenset({"STARTTLS", "LOGIN", "AUTHENTICATE"})
_AUTH: Final = frozenset({
    "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "LIST", "LSUB", "STATUS",
    "ENABLE", "IDLE", "APPEND", "NAMESPACE", "SUBSCRIBE", "UNSUBSCRIBE",
})
_SELECTED: Final = _AUTH | frozenset({
    "UNSELECT", "CLOSE", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
})
# IC-13: which commands each state allows (state moves only on tagged completions).
_ALLOWED: Final = {
    State.NOT_AUTHENTICATED: _ANY | _NOT_AUTH,
    State.AUTHENTICATED: _ANY | _AUTH,
    State.SELECTED: _ANY | _SELECTED,
}
_STATUS: Final = re.compile(
    rb"(\S+) (OK|NO|BAD|PREAUTH|BYE)(?: (.*))?", re.IGNORECASE | re.DOTALL
)
# IC-01: a line ending in {n}, {n+} (server misuse: read as {n}) or ~{n} (literal8).
_LITERAL_AT_END: Final = re.compile(rb"~?\{(\d{1,20})(\+?)\}$")
_FETCH_START: Final = re.compile(rb"\* (\d+) FETCH ", re.IGNORECASE)
_BODY_SECTION: Final = re.compile(
    rb"((?:BODY|BINARY)(?:\.PEEK)?\[[^\]]*\](?:<\d+>)?|RFC822(?:\.HEADER|\.TEXT)?) ~?$",
    re.IGNORECASE,
)
LITERAL_MINUS_MAX: Final = 4096  # RFC 7888 §4


class ImapConnection:
    """The client side of one IMAP4rev1/rev2 connection, without I/O.

    :param max_response: most non-literal octets in one response (IC-10).
    :param max_inline_literal: largest literal kept in memory outside a FETCH body.
    :param max_literal: largest FETCH body literal accepted (streamed, never held).
    :param chunk_size: largest :class:`LiteralChunk` emitted.
    """

    def __init__(
        self,
        *,
        max_response: int = 64 * 2**20,
        max_inline_literal: int = 2**20,
        max_literal: int = 2**40,
        chunk_size: int = 256 * 1024,
    ) -> None:
        self.max_response = max_response
        self.max_inline_literal = max_inline_literal
        self.max_literal = max_literal
        self.chunk_size = chunk_size
        self.state = State.NOT_AUTHENTICATED
        self.capabilities: frozenset[str] | None = None
        self.greeting: Greeting | None = None
        self.bare_lf_seen = False
        self._tags = itertools.count(1)
        self._outstanding: dict[str, Command] = {}
        self._waiting_literal: str | None = None  # tag whose octets wait for "+"
        self._pending: deque[bytes] = deque()
        self._outbox = bytearray()
        self._buf = bytearray()
        self._eof = False
        self._frags: list[bytes | Value] = []
        self._frag_len = 0
        self._literal_left = 0
        self._literal_size = 0
        self._literal_streamed = False
        self._literal_buf = bytearray()
        self._events: deque[Event] = deque()
        self._phase_caps: frozenset[str] | None = None
        self._idle_tag: str | None = None

    # --- sending ----------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Octets received and not yet parsed (after STARTTLS's OK this must be 0)."""
        return len(self._buf)

    @property
    def waiting_literal(self) -> bool:
        """True while a synchronizing literal waits for the server's ``+`` (IC-07)."""
        return self._waiting_literal is not None

    @property
    def outstanding(self) -> dict[str, Command]:
        """Commands sent and not yet completed, by tag (a copy)."""
        return dict(self._outstanding)

    def send(self, command: Command) -> bytes:
        """Tag ``command`` and return the bytes to write now.

        Octets after a synchronizing literal are held until the server's ``+`` and
        then come out of :meth:`data_to_send` (IC-07).

        Raises:
            LocalProtocolError: the state forbids the command, a literal still waits
                for its continuation, or IDLE is running (IC-13, IP-03).
        """
        self._check_usable()
        if self._waiting_literal is not None:
            raise LocalProtocolError("a literal is waiting for its continuation")
        if self._idle_tag is not None:
            raise LocalProtocolError("IDLE is running; send DONE first")
        allowed = _ALLOWED.get(self.state, frozenset())
        if command.verb not in allowed:
            raise LocalProtocolError(
                f"{command.name} is not allowed in state {self.state.value}"
            )
        tag = f"A{next(self._tags)}"
        segments = self._encode(tag, command)
        self._outstanding[tag] = command
        if command.name == "IDLE":
            self._idle_tag = tag
        if len(segments) > 1:
            self._waiting_literal = tag
            self._pending.extend(segments[1:])
        return segments[0]

    def _encode(self, tag: str, command: Command) -> list[bytes]:
        caps = self.capabilities or frozenset()
        segments: list[bytes] = []
        line = bytearray(f"{tag} {command.name}".encode())
        for arg in command.args:
            line += b" "
            if isinstance(arg, Atom):
                line += arg.encode("ascii")
            elif isinstance(arg, String) and arg.quotable:
                value = arg.value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
                line += b'"' + value + b'"'
            else:
                size = len(arg.value)
                # IC-08: {n+} only when the current list allows it.
                plus = "LITERAL+" in caps or (
                    "LITERAL-" in caps and size <= LITERAL_MINUS_MAX
                )
                if plus:
                    line += b"{%d+}\r\n" % size + arg.value
                else:
                    line += b"{%d}\r\n" % size
                    segments.append(bytes(line))
                    line = bytearray(arg.value)
        line += b"\r\n"
        segments.append(bytes(line))
        return segments

    def data_to_send(self) -> bytes:
        """Bytes released by the protocol itself (literal octets after ``+``)."""
        out, self._outbox = bytes(self._outbox), bytearray()
        return out

    def send_continuation(self, data: bytes) -> bytes:
        """Answer an AUTHENTICATE challenge with ``data`` (base64-encoded here)."""
        self._check_usable()
        if not any(c.name == "AUTHENTICATE" for c in self._outstanding.values()):
            raise LocalProtocolError("no AUTHENTICATE in progress")
        return base64.b64encode(data) + b"\r\n"

    def send_cancel(self) -> bytes:
        """Cancel an AUTHENTICATE exchange (RFC 9051 §6.2.2: a line ``*``)."""
        return b"*\r\n"

    def send_done(self) -> bytes:
        """End IDLE (RFC 2177 §3): ``DONE``; its tagged OK follows."""
        if self._idle_tag is None:
            raise LocalProtocolError("IDLE is not running")
        self._idle_tag = None
        return b"DONE\r\n"

    def _check_usable(self) -> None:
        if self.state is State.ERROR:
            raise LocalProtocolError("the connection failed earlier; open a new one")

    # --- receiving --------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the server; ``b""`` means the server closed the connection."""
        if data:
            if self._eof:
                raise LocalProtocolError("data after EOF")
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: the server broke the protocol (the state is ERROR).
        """
        if self.state is State.ERROR:
            raise RemoteProtocolError("the connection failed earlier")
        try:
            while not self._events:
                if not self._step():
                    return NEED_DATA
        except RemoteProtocolError:
            self.state = State.ERROR
            raise
        except ValueError as exc:
            self.state = State.ERROR
            raise RemoteProtocolError(f"malformed response: {exc}") from None
        return self._events.popleft()

    def _step(self) -> bool:
        """Consume what the buffer allows; False when more data is needed."""
        if self._literal_left:
            return self._step_literal()
        idx = self._buf.find(b"\n")
        if idx < 0:
            if self._frag_len + len(self._buf) > self.max_response:
                raise RemoteProtocolError(
                    f"response longer than {self.max_response} octets without CRLF"
                )
            if self._eof:
                if self._buf or self._frags:
                    raise RemoteProtocolError("connection closed in the middle of a response")
                self._events.append(Closed())
                self._eof = False  # reported once
                self._buf.clear()
                return True
            return False
        line = bytes(self._buf[: idx + 1])
        del self._buf[: idx + 1]
        self._frag_len += len(line)
        if self._frag_len > self.max_response:
            raise RemoteProtocolError(f"response longer than {self.max_response} octets")
        if line.endswith(b"\r\n"):
            line = line[:-2]
        else:
            line = line[:-1]  # IC-01 POLICY: a lone LF ends a line outside literals
            self.bare_lf_seen = True
        match = _LITERAL_AT_END.search(line)
        if match is not None and not (not self._frags and line.startswith(b"+")):
            self._start_literal(line, match)
            return True
        self._frags.append(line)
        frags, self._frags, self._frag_len = self._frags, [], 0
        self._complete(frags)
        return True

    def _start_literal(self, line: bytes, match: re.Match[bytes]) -> None:
        size = int(match[1])
        head = line[: match.start()]
        first = head if not self._frags else self._frags[0]
        fetch = isinstance(first, bytes) and _FETCH_START.match(first)
        section = _BODY_SECTION.search(head) if fetch else None
        self._frags.append(head)
        if section is not None and fetch:
            if size > self.max_literal:
                raise RemoteProtocolError(
                    f"FETCH literal of {size} octets exceeds the cap {self.max_literal}"
                )
            self._literal_streamed = True
            self._events.append(
                LiteralStart(
                    number=int(fetch[1]),
                    section=section[1].decode("ascii").upper(),
                    size=size,
                )
            )
        else:
            if size > self.max_inline_literal:
                raise RemoteProtocolError(
                    f"literal of {size} octets outside a FETCH body exceeds "
                    f"{self.max_inline_literal}"
                )
            self._literal_streamed = False
        self._literal_left = self._literal_size = size
        if size == 0:
            self._finish_literal()

    def _step_literal(self) -> bool:
        if not self._buf:
            if self._eof:
                raise ClosedMidResponse(
                    f"connection closed inside a literal ({self._literal_left} octets missing)"
                )
            return False
        take = min(len(self._buf), self._literal_left, self.chunk_size)
        data = bytes(self._buf[:take])
        del self._buf[:take]
        self._literal_left -= take
        if self._literal_streamed:
            self._events.append(LiteralChunk(data=data))
        else:
            self._literal_buf += data
        if not self._literal_left:
            self._finish_literal()
        return True

    def _finish_literal(self) -> None:
        if self._literal_streamed:
            self._events.append(LiteralEnd())
            self._frags.append(Literal(self._literal_size))
        else:
            self._frags.append(_InlineLiteral(self._literal_buf))
            self._literal_buf = bytearray()
        self._literal_streamed = False

    # --- classifying complete responses -------------------------------------------

    def _complete(self, frags: list[bytes | Value]) -> None:
        first = frags[0]
        assert isinstance(first, bytes)
        if self.greeting is None:
            self._greeting(first, len(frags))
            return
        if first.startswith(b"+"):  # IC-02: continuation
            self._continuation(first)
            return
        status = _STATUS.fullmatch(first) if len(frags) == 1 else None
        if first.startswith(b"* ") or first == b"*":
            if status is not None and status[1] == b"*":
                self._untagged_status(status)
            else:
                self._untagged_data(frags)
            return
        if status is None:
            raise RemoteProtocolError(f"unparsable response {first[:60]!r}")
        self._tagged(status)

    def _greeting(self, line: bytes, parts: int) -> None:
        status = _STATUS.fullmatch(line) if parts == 1 else None
        if status is None or status[1] != b"*" or status[2].upper() not in (
            b"OK", b"PREAUTH", b"BYE",
        ):
            raise RemoteProtocolError(f"not an IMAP greeting: {_what_peer(line)}")
        word = status[2].upper().decode()
        code, text = _resp_text(status[3])
        self.greeting = Greeting(status=word, code=code, text=text)
        self._take_code_caps(code)
        if word == "PREAUTH":
            self.state = State.AUTHENTICATED
        elif word == "BYE":
            self.state = State.LOGOUT
        self._events.append(self.greeting)

    def _continuation(self, line: bytes) -> None:
        text = line[2:] if line.startswith(b"+ ") else line[1:]
        if self._waiting_literal is not None:
            self._outbox += self._pending.popleft()
            if not self._pending:
                self._waiting_literal = None
            return
        waiting = any(
            c.name in ("AUTHENTICATE", "IDLE") for c in self._outstanding.values()
        )
        if not waiting:
            raise RemoteProtocolError("continuation request while none was expected")
        self._events.append(Continuation(text=text))

    def _untagged_status(self, match: re.Match[bytes]) -> None:
        word = match[2].upper().decode()
        code, text = _resp_text(match[3])
        if word == "PREAUTH":
            raise RemoteProtocolError("PREAUTH after the greeting")
        if word == "BYE":
            self.state = State.LOGOUT
        self._take_code_caps(code)
        self._events.append(Status(status=word, code=code, text=text))

    def _untagged_data(self, frags: list[bytes | Value]) -> None:
        values = list(tokenize(frags))
        if len(values) < 2:
            raise RemoteProtocolError("empty untagged response")
        number: int | None = None
        name = values[1]
        rest = values[2:]
        if isinstance(name, str) and name.isdigit():
            number = parse_number(name, limit=2**64 - 1)
            if not rest:
                raise RemoteProtocolError("untagged number without a name")
            name, rest = rest[0], rest[1:]
        if not isinstance(name, str):
            raise RemoteProtocolError("untagged response without a name")
        upper = name.upper()
        if upper == "CAPABILITY":
            self._set_caps(capability_names(rest))
        self._events.append(Data(name=upper, number=number, values=tuple(rest)))

    def _tagged(self, match: re.Match[bytes]) -> None:
        tag = match[1].decode("ascii", "replace")
        command = self._outstanding.pop(tag, None)
        if command is None:
            raise RemoteProtocolError(f"completion for unknown tag {tag[:20]!r}")
        word = match[2].upper().decode()
        if word not in ("OK", "NO", "BAD"):
            raise RemoteProtocolError(f"tagged {word} is not a completion")
        code, text = _resp_text(match[3])
        if self._waiting_literal == tag:  # IC-07: refused before "+": drop the octets
            self._waiting_literal = None
            self._pending.clear()
        if self._idle_tag == tag:
            self._idle_tag = None
        verb = command.verb
        if word == "OK":
            if verb in ("STARTTLS", "LOGIN", "AUTHENTICATE"):
                # IC-12: a new phase forgets the old list, keeping one that came
                # with the completion (Dovecot's [CAPABILITY] code, Gmail's data).
                self.capabilities = None if verb == "STARTTLS" else self._phase_caps
                if verb != "STARTTLS":
                    self.state = State.AUTHENTICATED
            if verb in ("SELECT", "EXAMINE"):
                self.state = State.SELECTED
            elif verb in ("UNSELECT", "CLOSE"):
                self.state = State.AUTHENTICATED
            elif verb == "LOGOUT":
                self.state = State.LOGOUT
        elif verb in ("SELECT", "EXAMINE") and self.state is State.SELECTED:
            self.state = State.AUTHENTICATED  # RFC 9051 §6.3.2: a failed SELECT closes
        self._phase_caps = None
        if not (word == "OK" and verb == "STARTTLS"):
            # IC-12: a list sent with STARTTLS's OK came in clear text: never used.
            self._take_code_caps(code)
        self._events.append(
            Done(tag=tag, command=command, status=word, code=code, text=text)
        )

    def _take_code_caps(self, code: ResponseCode | None) -> None:
        if code is not None and code.name == "CAPABILITY":
            self._set_caps(capability_names(code.args))

    def _set_caps(self, caps: frozenset[str]) -> None:
        self.capabilities = caps
        if any(
            c.verb in ("LOGIN", "AUTHENTICATE") for c in self._outstanding.values()
        ):
            self._phase_caps = caps


def _resp_text(raw: bytes | None) -> tuple[ResponseCode | None, str]:
    """resp-text: an optional ``[CODE args]`` right after the status word (IC-35)."""
    text = (raw or b"").decode("utf-8", "replace")
    if not text.startswith("["):
        return None, text
    end = text.find("]")
    if end < 0:
        return None, text
    name, _, args = text[1:end].partition(" ")
    return ResponseCode(name=name.upper(), args=args), text[end + 1 :].lstrip(" ")


def _what_peer(line: bytes) -> str:
    """Name the protocol a wrong greeting belongs to (IC-11)."""
    if line.startswith(b"\x16\x03"):
        return "TLS on this port (use security = 'tls')"
    if line.startswith((b"+OK", b"-ERR")):
        return "a POP3 server"
    if re.match(rb"\d{3}[ -]", line):
        return "an SMTP server"
    return repr(line[:60])


# --- tokenizing ---------------------------------------------------------------------


class _InlineLiteral(bytes):
    """A literal's octets among a response's text pieces (told apart by type)."""

    __slots__ = ()


def _atom(text: str) -> Atom:
    return str.__new__(Atom, text)


_DELIMS: Final = b" ()"


def tokenize(frags: list[bytes | Value]) -> list[Value]:
    """Parse response pieces (text and literals) into a value tree (IC-04, IC-05).

    Atoms keep their brackets (``BODY[HEADER.FIELDS (FROM)]`` is one atom); quoted
    strings and literals become bytes; ``NIL`` becomes None; lists become tuples.
    """
    stack: list[list[Value]] = [[]]
    for frag in frags:
        if type(frag) is not bytes:
            stack[-1].append(bytes(frag) if isinstance(frag, bytes) else frag)
            continue
        _lex_into(frag, stack)
    if len(stack) != 1:
        raise ValueError("unbalanced parentheses")
    return stack[0]


def _lex_into(text: bytes, stack: list[list[Value]]) -> None:
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == 0x20:
            i += 1
        elif c == 0x28:  # (
            stack.append([])
            i += 1
        elif c == 0x29:  # )
            if len(stack) == 1:
                raise ValueError("unbalanced ')'")
            done = tuple(stack.pop())
            stack[-1].append(done)
            i += 1
        elif c == 0x22:  # "
            value, i = _quoted(text, i + 1)
            stack[-1].append(value)
        else:
            start = i
            depth = 0
            while i < n:
                ch = text[i]
                if ch == 0x5B:
                    depth += 1
                elif ch == 0x5D and depth:
                    depth -= 1
                elif depth == 0 and ch in _DELIMS:
                    break
                i += 1
            word = text[start:i].decode("utf-8", "surrogateescape")
            stack[-1].append(None if word.upper() == "NIL" else _atom(word))


def _quoted(text: bytes, i: int) -> tuple[bytes, int]:
    out = bytearray()
    n = len(text)
    while i < n:
        c = text[i]
        if c == 0x5C:  # backslash: only \" and \\ (IC-04)
            if i + 1 >= n or text[i + 1] not in b'"\\':
                raise ValueError("bad escape in quoted string")
            out.append(text[i + 1])
            i += 2
        elif c == 0x22:
            return bytes(out), i + 1
        else:
            out.append(c)
            i += 1
    raise ValueError("unterminated quoted string")


__all__ = [
    "NEED_DATA",
    "ImapConnection",
    "ImapProtocolError",
    "LocalProtocolError",
    "NeedData",
    "RemoteProtocolError",
    "State",
    "tokenize",
]
