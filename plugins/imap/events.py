"""IMAP4 values: commands to send, events received, and the pure parsers over them.

Values only (h11 style): frozen dataclasses compared by exact type, so don't subclass
them. Commands are built from a typed tree (IC-03, IS-08): a keyword, then arguments
that are either :class:`Atom` (sent as-is after validation) or :class:`String` (sent
quoted, or as a literal when not 7-bit printable, IC-06). Nothing is ever pasted
into a command line from user text.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

# IC-09: UIDs, UIDVALIDITY, UIDNEXT and sequence numbers are 1..2**32-1.
MAX_NUMBER: Final = 2**32 - 1
MAX_NUMBER64: Final = 2**63 - 1

# IS-07: CR, LF, NUL and other controls never reach the wire from an argument.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Atoms we build ourselves: sets, fetch items, flags, keywords, section specs.
_ATOM = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")


class Atom(str):
    """A token sent verbatim (a keyword, a UID set, ``(UID BODY.PEEK[])``).

    Only printable ASCII with single spaces between words is accepted (IC-03: one SP
    between tokens, no trailing SP); anything else raises ``ValueError``.
    """

    __slots__ = ()

    def __new__(cls, text: str) -> Atom:
        if not _ATOM.fullmatch(text):
            raise ValueError(f"not an IMAP atom: {text[:40]!r}")
        return super().__new__(cls, text)


@dataclass(frozen=True, slots=True)
class String:
    """An astring argument: quoted when 7-bit printable, otherwise a literal (IC-06).

    ``value`` is text (UTF-8 on the wire) or bytes. CR, LF and NUL are refused when
    the value is built (IS-07), so a user name can never end a command line.
    ``repr`` never shows the value: arguments may be secrets (IS-12).
    """

    value: bytes = field(repr=False)

    def __init__(self, value: str | bytes) -> None:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if any(b in raw for b in b"\r\n\x00"):
            raise ValueError("CR, LF or NUL in an IMAP string argument")
        object.__setattr__(self, "value", raw)

    @property
    def quotable(self) -> bool:
        """True when it can go out as a quoted string (7-bit printable)."""
        return all(0x20 <= b < 0x7F for b in self.value)


Arg: TypeAlias = Atom | String


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """One tagged command: ``name`` (``"UID FETCH"``) and its arguments.

    ``sensitive`` masks the arguments in ``repr`` and traces (IS-12: LOGIN,
    AUTHENTICATE). Build commands with the functions below rather than directly.
    """

    name: str
    args: tuple[Arg, ...] = ()
    sensitive: bool = False

    def __post_init__(self) -> None:
        Atom(self.name)

    def __repr__(self) -> str:
        args = "<hidden>" if self.sensitive else " ".join(
            a if isinstance(a, Atom) else repr(a.value) for a in self.args
        )
        return f"Command({self.name} {args})"

    @property
    def verb(self) -> str:
        """The keyword that decides the state transition (``FETCH`` for UID FETCH)."""
        parts = self.name.split()
        return parts[1] if parts[0] == "UID" and len(parts) > 1 else parts[0]


# --- command builders ---------------------------------------------------------------


def capability() -> Command:
    """``CAPABILITY``."""
    return Command(name="CAPABILITY")


def noop() -> Command:
    """``NOOP``."""
    return Command(name="NOOP")


def logout() -> Command:
    """``LOGOUT``."""
    return Command(name="LOGOUT")


def starttls() -> Command:
    """``STARTTLS`` (IC-16)."""
    return Command(name="STARTTLS")


def login(user: str, password: str) -> Command:
    """``LOGIN user password`` (IC-17), both as strings, never in a trace (IS-12)."""
    return Command(name="LOGIN", args=(String(user), String(password)), sensitive=True)


def authenticate(mechanism: str, initial: str | None = None) -> Command:
    """``AUTHENTICATE mech [initial]`` (IC-18; the initial response needs SASL-IR).

    ``initial`` is already base64; an empty initial response is ``=`` (RFC 4959 §3).
    """
    args: tuple[Arg, ...] = (Atom(mechanism),)
    if initial is not None:
        args += (Atom(initial or "="),)
    return Command(name="AUTHENTICATE", args=args, sensitive=True)


def id_command(params: Mapping[str, str] | None) -> Command:
    """``ID (...)`` (RFC 2971, IC-14/IS-15): only name and version, never host data."""
    if not params:
        return Command(name="ID", args=(Atom("NIL"),))
    inner = " ".join(f'"{_quote_text(k)}" "{_quote_text(v)}"' for k, v in params.items())
    return Command(name="ID", args=(Atom(f"({inner})"),))


def _quote_text(text: str) -> str:
    if _CONTROL.search(text) or not text.isascii():
        raise ValueError("ID values must be printable ASCII")
    return text.replace("\\", "\\\\").replace('"', '\\"')


def select(mailbox: bytes, *, readonly: bool = False) -> Command:
    """``SELECT``/``EXAMINE`` of a mailbox given in its wire form (IC-23)."""
    return Command(name="EXAMINE" if readonly else "SELECT", args=(String(mailbox),))


def unselect() -> Command:
    """``UNSELECT`` (RFC 3691): leaves the mailbox without expunging (IC-39)."""
    return Command(name="UNSELECT")


def create(mailbox: bytes) -> Command:
    """``CREATE`` (used for acknowledgement folders on ``[TRYCREATE]``)."""
    return Command(name="CREATE", args=(String(mailbox),))


def uid_search(criteria: str) -> Command:
    """``UID SEARCH criteria`` (IC-33); criteria is built by the caller from atoms."""
    return Command(name="UID SEARCH", args=(Atom(criteria),))


def uid_fetch(uids: str, items: str) -> Command:
    """``UID FETCH set (items)`` (IC-29); ``uids`` from :func:`uid_set`."""
    return Command(name="UID FETCH", args=(Atom(uids), Atom(f"({items})")))


def uid_store(uids: str, change: str, flags: Sequence[str]) -> Command:
    """``UID STORE set +FLAGS.SILENT (flags)`` (IC-37, IC-42)."""
    return Command(
        name="UID STORE", args=(Atom(uids), Atom(change), Atom(f"({' '.join(flags)})"))
    )


def uid_expunge(uids: str) -> Command:
    """``UID EXPUNGE set`` (UIDPLUS; IC-37). Never a bare EXPUNGE (IC-38)."""
    return Command(name="UID EXPUNGE", args=(Atom(uids),))


def uid_move(uids: str, mailbox: bytes) -> Command:
    """``UID MOVE set mailbox`` (RFC 6851; IC-40)."""
    return Command(name="UID MOVE", args=(Atom(uids), String(mailbox)))


def uid_copy(uids: str, mailbox: bytes) -> Command:
    """``UID COPY set mailbox`` (IC-41)."""
    return Command(name="UID COPY", args=(Atom(uids), String(mailbox)))


def status(mailbox: bytes, items: str = "UIDNEXT") -> Command:
    """``STATUS mailbox (items)`` (RFC 9051 §6.3.11) of a mailbox that is not selected
    (push polling, IC-44)."""
    return Command(name="STATUS", args=(String(mailbox), Atom(f"({items})")))


def idle() -> Command:
    """``IDLE`` (RFC 2177; IC-43); ended with :meth:`ImapConnection.send_done`."""
    return Command(name="IDLE")


def uid_set(uids: Iterable[int]) -> str:
    """The shortest UID set for ``uids`` (IC-34): sorted, ranges as ``a:b``, no 0."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("an empty UID set cannot be sent")
    if ordered[0] < 1 or ordered[-1] > MAX_NUMBER:
        raise ValueError("UIDs are 1..2**32-1")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in [*ordered[1:], -1]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = uid
    return ",".join(parts)


def split_uid_sets(uids: Iterable[int], max_len: int = 4000) -> list[str]:
    """UID sets no longer than ``max_len`` characters each (IC-10: command lines stay
    well under 8192 octets)."""
    out: list[str] = []
    chunk: list[int] = []
    for uid in sorted(set(uids)):
        chunk.append(uid)
        if len(chunk) % 64 == 0 and len(uid_set(chunk)) > max_len:
            out.append(uid_set(chunk[:-64]))
            chunk = chunk[-64:]
    if chunk:
        out.append(uid_set(chunk))
    return out


# --- received values ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Literal:
    """A literal whose octets were streamed as :class:`LiteralChunk` events (IC-31)."""

    size: int


#: A parsed response value: an atom, a string (quoted or literal) as bytes, NIL as
#: None, a parenthesised list as a tuple, or a streamed literal.
Value: TypeAlias = "Atom | bytes | tuple[Value, ...] | Literal | None"


@dataclass(frozen=True, slots=True)
class ResponseCode:
    """``[NAME args]`` after a status word (IC-35); ``name`` upper-case.

    ``args`` is the raw text between the name and ``]`` (``"3857529045"``,
    ``"(\\Deleted \\Seen \\*)"``, ``"38505 42 3956"``).
    """

    name: str
    args: str = ""

    def number(self) -> int:
        """The argument as a 32-bit number (IC-09); ValueError when it is not one."""
        return parse_number(self.args)


@dataclass(frozen=True, slots=True, kw_only=True)
class Greeting:
    """The server greeting (IC-11): ``status`` is OK, PREAUTH or BYE."""

    status: str
    code: ResponseCode | None
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """An untagged ``* OK|NO|BAD|BYE`` (IC-36), e.g. ``* OK [UIDVALIDITY n]``."""

    status: str
    code: ResponseCode | None
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """The tagged completion of ``command``: OK, NO or BAD with an optional code."""

    tag: str
    command: Command
    status: str
    code: ResponseCode | None
    text: str

    @property
    def ok(self) -> bool:
        """True for a tagged OK."""
        return self.status == "OK"


@dataclass(frozen=True, slots=True, kw_only=True)
class Continuation:
    """A ``+`` line surfaced to the driver (AUTHENTICATE challenges, IDLE)."""

    text: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Data:
    """Any other untagged response: ``* [number] NAME values`` (CAPABILITY, FLAGS,
    SEARCH, ESEARCH, EXISTS, EXPUNGE, FETCH, LIST, ENABLED, ID, VANISHED...)."""

    name: str
    number: int | None
    values: tuple[Value, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class LiteralStart:
    """A FETCH body literal begins (IC-31): ``section`` as sent (``BODY[]``)."""

    number: int
    section: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LiteralChunk:
    """Some octets of the current FETCH body literal, never interpreted (IT-01)."""

    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class LiteralEnd:
    """The current FETCH body literal is complete."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Closed:
    """The server closed the connection between responses."""


Event: TypeAlias = (
    Greeting | Status | Done | Continuation | Data | LiteralStart | LiteralChunk
    | LiteralEnd | Closed
)


# --- pure parsers over values -------------------------------------------------------


def parse_number(text: str | bytes | Value, *, limit: int = MAX_NUMBER) -> int:
    """A decimal number within ``limit`` (IC-09): never wraps, never a float."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not isinstance(text, str) or not text.isdigit() or not text.isascii():
        raise ValueError(f"not a number: {str(text)[:20]!r}")
    value = int(text)
    if value > limit:
        raise ValueError(f"number {text[:24]} out of range")
    return value


def capability_names(values: Iterable[Value] | str) -> frozenset[str]:
    """Capability names, upper-cased (IC-12: compared case-insensitively)."""
    words = values.split() if isinstance(values, str) else [
        v for v in values if isinstance(v, str)
    ]
    return frozenset(w.upper() for w in words)


def fetch_items(values: Sequence[Value]) -> dict[str, Value]:
    """``(NAME value NAME value ...)`` of a FETCH into a dict keyed upper-case (IC-29).

    A name repeated with a different value keeps the first (IT-05 POLICY).
    """
    if len(values) != 1 or not isinstance(values[0], tuple):
        raise ValueError("FETCH data is not a parenthesised list")
    items = values[0]
    if len(items) % 2:
        raise ValueError("FETCH data has an odd number of items")
    out: dict[str, Value] = {}
    for name, value in zip(items[::2], items[1::2], strict=True):
        if not isinstance(name, str):
            raise ValueError("FETCH item name is not an atom")
        out.setdefault(name.upper(), value)
    return out


def status_items(values: Sequence[Value]) -> tuple[bytes, dict[str, int]]:
    """``* STATUS mailbox (NAME n ...)`` → (mailbox as sent, {NAME: n}) (IC-44).

    Raises:
        ValueError: not a mailbox followed by a parenthesised list of pairs.
    """
    if len(values) != 2 or not isinstance(values[1], tuple) or len(values[1]) % 2:
        raise ValueError("STATUS data is not a mailbox and a list of pairs")
    mailbox = values[0]
    if isinstance(mailbox, str):
        name = mailbox.encode("ascii", "replace")
    elif isinstance(mailbox, bytes):
        name = mailbox
    else:
        raise ValueError("STATUS mailbox is not an atom or a string")
    items = values[1]
    out: dict[str, int] = {}
    for key, value in zip(items[::2], items[1::2], strict=True):
        if isinstance(key, str):
            out.setdefault(key.upper(), parse_number(value))
    return name, out


def copyuid(code: ResponseCode | None) -> tuple[int, dict[int, int]] | None:
    """``[COPYUID validity src dst]`` → (validity, {src uid: dst uid}) (IC-40)."""
    if code is None or code.name != "COPYUID":
        return None
    parts = code.args.split()
    if len(parts) != 3:
        return None
    src, dst = _expand(parts[1]), _expand(parts[2])
    if len(src) != len(dst):
        return None
    return parse_number(parts[0]), dict(zip(src, dst, strict=True))


def _expand(uidset: str) -> list[int]:
    out: list[int] = []
    for part in uidset.split(","):
        lo, _, hi = part.partition(":")
        a, b = parse_number(lo), parse_number(hi or lo)
        if a > b:
            a, b = b, a
        if b - a > 1_000_000:
            raise ValueError("UID range too long")
        out.extend(range(a, b + 1))
    return out


def search_uids(values: Sequence[Value]) -> list[int]:
    """The numbers of a ``* SEARCH`` response (IC-33)."""
    return [parse_number(v) for v in values if isinstance(v, str) and v.isdigit()]


def esearch_all(values: Sequence[Value]) -> list[int]:
    """The ``ALL`` set of an ``* ESEARCH`` response (IC-33; RFC 4731 §3.1): none
    without it."""
    words = [v for v in values if not isinstance(v, tuple)]
    for name, value in itertools.pairwise(words):
        if isinstance(name, str) and name.upper() == "ALL" and isinstance(value, str):
            return _expand(value)
    return []


def flag_list(value: Value) -> tuple[str, ...]:
    """A parenthesised flag list as strings (``\\Seen``, ``$Keyword``, ``\\*``)."""
    if not isinstance(value, tuple):
        return ()
    return tuple(v for v in value if isinstance(v, str))
