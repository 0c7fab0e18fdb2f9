"""Fault injection for the fake POP3 server: what a session should get wrong, and where."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Faults"]


@dataclass(kw_only=True)
class Faults:
    """Misbehaviour for :class:`~mailpipe.testing.Pop3Server` sessions; all off by default.

    Give one ``Faults`` for every session, or a list to fault sessions in turn (the
    first to session 1 and so on; later sessions behave). Command names are matched
    case-insensitively; a key may carry arguments (``"RETR 2"``) to pick one message.

    Connection faults:
        ``drop_after_bytes``: close (RST) once the server has sent this many octets in
        the session, greeting included. ``drop_in_retr``: during ``RETR k`` send the
        status line and ``drop_in_retr_fraction`` of the body, then close. ``drop_on``:
        close without replying when one of these commands arrives. ``stall_on``: wait
        ``stall_seconds`` before answering these commands (``"GREETING"`` stalls the
        greeting), then answer normally.

    Reply faults:
        ``greeting_err``: greet with ``-ERR <text>`` and close (e.g.
        ``"[SYS/TEMP] too busy"``). ``err_on``: answer ``-ERR <text>`` to a command,
        e.g. ``{"RETR 2": "[SYS/TEMP] try later", "PASS": "[LOGIN-DELAY] wait"}``.
        ``quit_err``: answer QUIT in TRANSACTION with ``-ERR <text>`` and delete
        nothing. ``dele_ignored``: answer ``+OK`` to DELE but never delete.
        ``status_padding``: pad every single-line reply text with this many octets
        (over-long status lines). ``scram_bad_signature``: SCRAM logins get a wrong
        server signature (a server that does not know the password).

    Framing faults:
        ``bare_lf``: end every line the server sends with LF instead of CRLF.
        ``no_dot_stuffing``: send body lines starting with ``.`` unstuffed (so a
        ``.`` line ends the body early, as in broken test servers).
        ``list_size_delta``: LIST and STAT report each size off by this many octets
        (``{k: delta}`` for message k only). ``short_retr_after_top``: ``RETR k``
        after ``TOP k`` in the same session sends the header section only (GNU
        Mailutils pop3d does this to some messages). ``utf8_notice``: until the
        client sends ``UTF8``, a message with 8-bit header octets is served as a
        short notice instead (Courier; needs ``Pop3Server(utf8=True)``).

    UIDL faults:
        ``uidl_unsupported``: no UIDL in CAPA and ``-ERR`` to UIDL.
        ``uidl_missing``: message numbers left out of the UIDL listing (and ``-ERR``
        to ``UIDL k``). ``uidl_duplicate``: every message reports message 1's uid.
        ``uidl_length``: pad uids to this many characters (RFC 1939 §7 caps it at 70).
    """

    drop_after_bytes: int | None = None
    drop_in_retr: int | None = None
    drop_in_retr_fraction: float = 0.5
    drop_on: frozenset[str] | set[str] = field(default_factory=frozenset)
    stall_on: frozenset[str] | set[str] = field(default_factory=frozenset)
    stall_seconds: float = 3600.0
    greeting_err: str | None = None
    err_on: dict[str, str] = field(default_factory=dict)
    quit_err: str | None = None
    dele_ignored: bool = False
    status_padding: int = 0
    scram_bad_signature: bool = False
    bare_lf: bool = False
    no_dot_stuffing: bool = False
    list_size_delta: int | dict[int, int] = 0
    short_retr_after_top: bool = False
    utf8_notice: bool = False
    uidl_unsupported: bool = False
    uidl_missing: frozenset[int] | set[int] = field(default_factory=frozenset)
    uidl_duplicate: bool = False
    uidl_length: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_in_retr_fraction < 1.0:
            raise ValueError("drop_in_retr_fraction must be in [0, 1)")
        self.drop_on = frozenset(c.upper() for c in self.drop_on)
        self.stall_on = frozenset(c.upper() for c in self.stall_on)
        self.err_on = {_norm(k): v for k, v in self.err_on.items()}
        self.uidl_missing = frozenset(self.uidl_missing)

    def size_delta(self, number: int) -> int:
        """The LIST/STAT size error for message ``number``."""
        if isinstance(self.list_size_delta, dict):
            return self.list_size_delta.get(number, 0)
        return self.list_size_delta

    def matches(self, names: frozenset[str] | set[str], line: str) -> bool:
        """True when command ``line`` is in ``names`` by keyword or by full text."""
        return _keyword(line) in names or _norm(line) in names

    def err_for(self, line: str) -> str | None:
        """The ``-ERR`` text configured for command ``line``, or None."""
        text = self.err_on.get(_norm(line))
        return text if text is not None else self.err_on.get(_keyword(line))


def _keyword(line: str) -> str:
    return line.split(" ", 1)[0].upper()


def _norm(line: str) -> str:
    return " ".join(line.split()).upper()
