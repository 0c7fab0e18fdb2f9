"""POP3 commands, replies and pure parsers: values only, no I/O and no state.

Don't subclass these: :class:`~.protocol.Pop3Connection` dispatches on exact types.
Commands validate their arguments on construction (RFC 1939 §3; conformance C-01/C-02):
a CR, LF, NUL or any other C0 control or DEL in an argument raises ``ValueError`` before
anything can reach the wire. Sensitive commands mask their arguments in ``repr``.

A command that adds no field to its base (``Capa``, ``List``, ``Retr``...) is a plain
subclass with ``__slots__ = ()``: it inherits the frozen dataclass's ``__init__``,
``__eq__`` (exact class), ``__hash__``, ``__repr__`` (which names the subclass) and
frozen ``__setattr__``, so it is the same value a second ``@dataclass`` would make,
without generating those methods again at every start (~0.35 ms a class, issue 18).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Final

MASK: Final = "**********"
#: RFC 2449 §4: a command is at most 255 octets including CRLF.
MAX_COMMAND: Final = 255
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # aiosmtplib's injection guard (C-02, S-10)
_MECHANISM = re.compile(r"[A-Z0-9_-]{1,20}")  # S-10: mechanism names from config


def _arg(value: str, what: str, *, spaces: bool = False) -> bytes:
    raw = value.encode("utf-8")
    if _CONTROL.search(raw):
        raise ValueError(f"{what} contains a control character (CR, LF, NUL, ...)")
    if not spaces and b" " in raw:
        raise ValueError(f"{what} must not contain spaces")
    if not raw:
        raise ValueError(f"{what} must not be empty")
    return raw


def _number(value: int, what: str = "message number") -> bytes:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer")
    return str(value).encode("ascii")


# --- Commands ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """Base of every command: ``keyword``, ``multiline`` (an ``+OK`` reply has a body),
    ``streams`` (the body is delivered as :class:`BodyChunk` events) and ``sensitive``
    (the wire bytes carry a secret and must never be logged)."""

    keyword: ClassVar[bytes] = b""
    multiline: ClassVar[bool] = False
    streams: ClassVar[bool] = False
    sensitive: ClassVar[bool] = False

    def args(self) -> list[bytes]:
        """The arguments, already validated."""
        return []

    def to_bytes(self) -> bytes:
        """The command line to write, CRLF included."""
        line = b" ".join([self.keyword, *self.args()]) + b"\r\n"
        if len(line) > MAX_COMMAND:
            raise ValueError(
                f"{self.keyword.decode()} command is {len(line)} octets; "
                f"RFC 2449 §4 allows {MAX_COMMAND}"
            )
        return line

    def describe(self) -> str:
        """A loggable form: the keyword and, unless sensitive, the arguments."""
        if self.sensitive:
            return self.keyword.decode()
        return b" ".join([self.keyword, *self.args()]).decode("utf-8", "replace")


@dataclass(frozen=True, slots=True, kw_only=True)
class User(Command):
    """``USER name`` (RFC 1939 §7)."""

    keyword: ClassVar[bytes] = b"USER"
    name: str

    def __post_init__(self) -> None:
        _arg(self.name, "user name")

    def args(self) -> list[bytes]:
        return [_arg(self.name, "user name")]


@dataclass(frozen=True, slots=True, kw_only=True)
class Pass(Command):
    """``PASS secret``; spaces are part of the password (RFC 1939 §7, C-18)."""

    keyword: ClassVar[bytes] = b"PASS"
    sensitive: ClassVar[bool] = True
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        _arg(self.password, "password", spaces=True)

    def args(self) -> list[bytes]:
        return [_arg(self.password, "password", spaces=True)]

    def __repr__(self) -> str:
        return f"Pass(password={MASK})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Apop(Command):
    """``APOP name digest`` (RFC 1939 §7); the digest is offline-crackable (S-08)."""

    keyword: ClassVar[bytes] = b"APOP"
    sensitive: ClassVar[bool] = True
    name: str
    digest: str = field(repr=False)

    def __post_init__(self) -> None:
        _arg(self.name, "user name")
        _arg(self.digest, "digest")

    def args(self) -> list[bytes]:
        return [_arg(self.name, "user name"), _arg(self.digest, "digest")]

    def __repr__(self) -> str:
        return f"Apop(name={self.name!r}, digest={MASK})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth(Command):
    """``AUTH mechanism [initial-response]`` (RFC 5034 §4); the response is base64 text.

    An empty initial response is sent as ``=`` (C-38); None sends none.
    """

    keyword: ClassVar[bytes] = b"AUTH"
    sensitive: ClassVar[bool] = True
    mechanism: str
    initial_response: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not _MECHANISM.fullmatch(self.mechanism):
            raise ValueError("SASL mechanism names are [A-Z0-9_-]{1,20}")
        if self.initial_response:
            _arg(self.initial_response, "initial response")

    def args(self) -> list[bytes]:
        out = [self.mechanism.encode("ascii")]
        if self.initial_response is not None:
            out.append(self.initial_response.encode("ascii") or b"=")
        return out

    def __repr__(self) -> str:
        return f"Auth(mechanism={self.mechanism!r}, initial_response={MASK})"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthResponse(Command):
    """One client line of a SASL exchange: base64 text, ``""`` or ``*`` to cancel.

    RFC 5034 §4 puts no length limit on these lines.
    """

    sensitive: ClassVar[bool] = True
    data: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.data:
            _arg(self.data, "SASL response")

    def to_bytes(self) -> bytes:
        return self.data.encode("ascii") + b"\r\n"

    def describe(self) -> str:
        return "AUTH continuation"

    def __repr__(self) -> str:
        return f"AuthResponse(data={MASK})"


class Capa(Command):
    """``CAPA`` (RFC 2449 §5): multi-line list of capabilities."""

    __slots__ = ()
    keyword: ClassVar[bytes] = b"CAPA"
    multiline: ClassVar[bool] = True


class Stls(Command):
    """``STLS`` (RFC 2595 §4): TLS starts right after the ``+OK``."""

    __slots__ = ()
    keyword: ClassVar[bytes] = b"STLS"


class Utf8(Command):
    """``UTF8`` (RFC 6856 §2): UTF-8 mode, valid in AUTHORIZATION only."""

    __slots__ = ()
    keyword: ClassVar[bytes] = b"UTF8"


class Stat(Command):
    """``STAT`` → ``+OK count octets`` (RFC 1939 §5)."""

    __slots__ = ()
    keyword: ClassVar[bytes] = b"STAT"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Numbered(Command):
    number: int

    def __post_init__(self) -> None:
        _number(self.number)

    def args(self) -> list[bytes]:
        return [_number(self.number)]


@dataclass(frozen=True, slots=True, kw_only=True)
class _OptionalNumber(Command):
    """A command with an optional message number: multi-line without it."""

    number: int | None = None

    def __post_init__(self) -> None:
        if self.number is not None:
            _number(self.number)

    @property
    def multiline(self) -> bool:  # type: ignore[override]
        return self.number is None

    def args(self) -> list[bytes]:
        return [] if self.number is None else [_number(self.number)]


class List(_OptionalNumber):
    """``LIST [n]``; multi-line without an argument (RFC 1939 §5, C-49)."""

    __slots__ = ()
    keyword: ClassVar[bytes] = b"LIST"


class Uidl(_OptionalNumber):
    """``UIDL [n]``; multi-line without an argument (RFC 1939 §7, C-53)."""

    __slots__ = ()
    keyword: ClassVar[bytes] = b"UIDL"


class Retr(_Numbered):
    """``RETR n``: the whole message, streamed as body chunks (RFC 1939 §5, C-51)."""

    __slots__ = ()
    keyword: ClassVar[bytes] = b"RETR"
    multiline: ClassVar[bool] = True
    streams: ClassVar[bool] = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Top(Command):
    """``TOP n lines``: headers plus ``lines`` body lines, streamed (RFC 1939 §7)."""

    keyword: ClassVar[bytes] = b"TOP"
    multiline: ClassVar[bool] = True
    streams: ClassVar[bool] = True
    number: int
    lines: int = 0

    def __post_init__(self) -> None:
        _number(self.number)
        _number(self.lines, "line count")

    def args(self) -> list[bytes]:
        return [_number(self.number), _number(self.lines, "line count")]


class Dele(_Numbered):
    """``DELE n``: marks only; the server deletes at QUIT (RFC 1939 §5, §6)."""

    __slots__ = ()
    keyword: ClassVar[bytes] = b"DELE"


class Noop(Command):
    """``NOOP`` (RFC 1939 §5)."""

    __slots__ = ()
    keyword: ClassVar[bytes] = b"NOOP"


class Rset(Command):
    """``RSET``: clears every deletion mark (RFC 1939 §5)."""

    __slots__ = ()
    keyword: ClassVar[bytes] = b"RSET"


class Quit(Command):
    """``QUIT``: in TRANSACTION, commits the deletions (RFC 1939 §6)."""

    __slots__ = ()
    keyword: ClassVar[bytes] = b"QUIT"


# --- Replies -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Greeting:
    """The server's ``+OK`` greeting; ``apop_timestamp`` only when it is a valid msg-id."""

    text: str
    apop_timestamp: bytes | None = None
    code: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ok:
    """A single-line ``+OK`` reply to ``command``; ``code`` is a RFC 2449 response code."""

    command: Command | None
    text: str
    code: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Err:
    """A ``-ERR`` reply (``command`` None for a refused greeting); ``code`` as in Ok."""

    command: Command | None
    text: str
    code: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Continuation:
    """A SASL challenge ``+ base64`` (RFC 5034 §4); ``text`` is the raw, undecoded part."""

    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MultiLine:
    """A collected multi-line ``+OK`` reply (CAPA, LIST, UIDL); body dot-unstuffed.

    ``newline`` is what ends the body's lines: CRLF, or LF in a bare-LF session (T-08).
    """

    command: Command
    text: str
    body: bytes
    code: str = ""
    newline: bytes = b"\r\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class BodyStart:
    """``+OK`` to a streaming command (RETR, TOP); chunks follow, then :class:`BodyEnd`."""

    command: Command
    text: str


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """Dot-unstuffed octets of the current body, in order (never decoded)."""

    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class BodyEnd:
    """The terminating ``.CRLF`` of a streamed body; ``octets`` is the unstuffed size."""

    command: Command
    octets: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed:
    """The server closed the connection with no command outstanding."""


Reply = Greeting | Ok | Err | Continuation | MultiLine | BodyStart | BodyChunk | BodyEnd
Event = Reply | ConnectionClosed


# --- Pure parsers ------------------------------------------------------------------

#: The response codes mailpipe acts on (RFC 2449 §8.1, RFC 3206 §4-§6).
KNOWN_CODES: Final = ("IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM", "AUTH")


def split_code(text: str) -> tuple[str, str]:
    """Split ``[CODE] rest`` into (upper-cased code, rest); ("", text) without one.

    RFC 2449 §8: codes are case-insensitive and hierarchical with ``/``.
    """
    if text.startswith("["):
        end = text.find("]")
        if 1 < end <= 256:
            return text[1:end].upper(), text[end + 1 :].lstrip(" ")
    return "", text


def code_class(code: str) -> str:
    """Return the known code that ``code`` falls under, ignoring unknown lower levels.

    ``SYS/TEMP/FOO`` → ``SYS/TEMP``; ``REFERRAL/host`` → ``""`` (C-30).
    """
    for known in KNOWN_CODES:
        if code == known or code.startswith(known + "/"):
            return known
    return ""


def apop_timestamp(text: bytes) -> bytes | None:
    """Return the greeting's APOP timestamp when it is a valid RFC 822 msg-id, else None.

    RFC 1939 §7: first ``<`` to the next ``>``; it must look like ``<local@domain>`` with
    no spaces or specials (fetchmail after CVE-2007-1558). Index scans only, no regex
    backtracking (CVE-2018-1060).
    """
    start = text.find(b"<")
    if start < 0:
        return None
    end = text.find(b">", start + 1)
    if end < 0:
        return None
    inner = text[start + 1 : end]
    if inner.count(b"@") != 1:
        return None
    local, _, domain = inner.partition(b"@")
    if not local or not domain:
        return None
    for ch in inner:
        if ch <= 0x20 or ch >= 0x7F or ch in b'()<>,;:\\"[]':
            return None
    return text[start : end + 1]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Parsed CAPA (RFC 2449 §5): upper-case tag names and each tag's arguments."""

    names: frozenset[str] = frozenset()
    args: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.upper() in self.names

    @property
    def sasl(self) -> tuple[str, ...]:
        """Advertised SASL mechanisms, upper-cased."""
        return tuple(m.upper() for m in self.args.get("SASL", ()))

    @property
    def login_delay(self) -> int | None:
        """``LOGIN-DELAY n`` in seconds (RFC 2449 §6.5), or None."""
        return _int_arg(self.args.get("LOGIN-DELAY"))

    @property
    def expire(self) -> int | None:
        """``EXPIRE n`` in days, -1 for NEVER (RFC 2449 §6.7), or None when absent."""
        values = self.args.get("EXPIRE")
        if not values:
            return None
        if values[0].upper() == "NEVER":
            return -1
        return _int_arg(values)

    def per_user(self, name: str) -> bool:
        """True when ``name`` carries the ``USER`` token (value known only after login)."""
        values = self.args.get(name.upper(), ())
        return any(v.upper() == "USER" for v in values[1:])


def _int_arg(values: tuple[str, ...] | None) -> int | None:
    if values and values[0].isdigit():
        return int(values[0])
    return None


def parse_capa(body: bytes) -> Capabilities:
    """Parse a CAPA body; tags are case-insensitive, unknown tags kept (C-23, T-33)."""
    names: set[str] = set()
    args: dict[str, tuple[str, ...]] = {}
    for raw in body.split(b"\n"):
        parts = raw.rstrip(b"\r").decode("ascii", "replace").split()
        if not parts:
            continue
        tag = parts[0].upper()
        names.add(tag)
        args[tag] = tuple(parts[1:])
    return Capabilities(frozenset(names), args)


def _lines(body: bytes, newline: bytes) -> list[bytes]:
    # §0.2: only ``newline`` (CRLF unless the session is bare-LF, T-08) ends a line;
    # in a bare-LF session an optional CR before the LF is dropped, as on status lines.
    lines = body.split(newline)
    if newline == b"\n":
        lines = [line.removesuffix(b"\r") for line in lines]
    return [line for line in lines if line.strip()]


def parse_stat(text: str) -> tuple[int, int]:
    """Parse ``+OK nn mm`` text into (count, octets); extra words ignored (C-48)."""
    parts = text.split()
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"malformed STAT reply {text[:80]!r}")
    return int(parts[0]), int(parts[1])


def parse_list(body: bytes, newline: bytes = b"\r\n") -> list[tuple[int, int]]:
    """Parse a LIST body into (number, size) pairs; trailing words ignored (C-49, T-43).

    ``newline`` is the body's line end (:attr:`MultiLine.newline`).
    """
    out: list[tuple[int, int]] = []
    for line in _lines(body, newline):
        parts = line.split()
        if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
            raise ValueError(f"malformed LIST line {line[:80]!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def parse_uidl(body: bytes, newline: bytes = b"\r\n") -> list[tuple[int, str]]:
    """Parse a UIDL body into (number, uid) pairs (RFC 1939 §7, C-53, T-24).

    The uid is everything after the first space, trailing whitespace stripped, decoded as
    latin-1 so every byte survives; a line with an empty uid is left out (that message
    then has no uid). ``newline`` is the body's line end (:attr:`MultiLine.newline`).
    """
    out: list[tuple[int, str]] = []
    for line in _lines(body, newline):
        number, _, uid = line.partition(b" ")
        if not number.isdigit():
            raise ValueError(f"malformed UIDL line {line[:80]!r}")
        uid = uid.strip(b" \t")
        if uid:
            out.append((int(number), uid.decode("latin-1")))
    return out


def parse_list_one(text: str) -> tuple[int, int]:
    """Parse ``LIST n`` reply text ``n size`` (C-49)."""
    return parse_stat(text)


def parse_uidl_one(text: str) -> str:
    """Parse ``UIDL n`` reply text ``n uid``; tolerate the uid alone (twisted#9104)."""
    parts = text.split()
    if len(parts) >= 2 and parts[0].isdigit():
        return parts[1]
    if len(parts) == 1:
        return parts[0]
    raise ValueError(f"malformed UIDL reply {text[:80]!r}")
