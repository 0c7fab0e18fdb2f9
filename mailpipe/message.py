"""Messages as they travel through a chain: a reference on the server plus the raw bytes."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from email.parser import BytesParser


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageRef:
    """Where a message lives: mailbox name, session-local number, UIDL and LIST size.

    ``number`` is valid only within one POP3 session (RFC 1939 §5); ``uid`` is stable
    across sessions (RFC 1939 §7 UIDL) or, on servers without UIDL, a content hash.
    """

    mailbox: str
    number: int
    uid: str
    size: int

    @property
    def key(self) -> str:
        """The stable message key (see :func:`message_key`)."""
        return message_key(self.mailbox, self.uid)


@lru_cache(maxsize=4096)
def message_key(mailbox: str, uid: str) -> str:
    """Return the stable key of a message: 32 hex digits of sha256(mailbox NUL uid).

    Safe as a file name, an SQL key and a header value; stores and forwarders use it for
    idempotency. Remembered for the latest 4,096 messages: the journal, the stores and
    the hooks ask it several times per message (issue 18).
    """
    return hashlib.sha256(f"{mailbox}\0{uid}".encode()).hexdigest()[:32]


_COPY = re.compile(r" #\d+$")


def is_renamed_copy(uid: str) -> bool:
    """True for a uid :func:`distinct_uids` gave to a 2nd, 3rd... copy."""
    return _COPY.search(uid) is not None


def distinct_uids(refs: list[MessageRef]) -> tuple[list[MessageRef], int]:
    """Give every listed message its own uid; return the refs and how many were renamed.

    RFC 1939 §7 lets a server list one uid for several identical messages (Dovecot's
    ``pop3_uidl_duplicates = allow``). The 2nd, 3rd... occurrence of a uid becomes
    ``"<uid> #<n>"`` (n = 2, 3... in message-number order), so each message has its own
    key and none is skipped as "already seen" (conformance T-23). A space cannot occur
    in an RFC 1939 uid (0x21-0x7E), so the name cannot be another message's uid; a
    non-conforming listing that holds it anyway gets the suffix repeated. Stable across
    sessions as long as the server lists the copies in the same order. Empty uids (no
    UIDL for that message) are left alone.
    """
    taken = {ref.uid for ref in refs}
    count: dict[str, int] = {}
    out: list[MessageRef] = []
    renamed = 0
    for ref in refs:
        n = count[ref.uid] = count.get(ref.uid, 0) + 1
        if n == 1 or not ref.uid:
            out.append(ref)
            continue
        suffix = f" #{n}"
        uid = ref.uid + suffix
        while uid in taken:
            uid += suffix
        taken.add(uid)
        out.append(
            MessageRef(mailbox=ref.mailbox, number=ref.number, uid=uid, size=ref.size)
        )
        renamed += 1
    return out, renamed


#: The most of a message's start read to find its header section (:attr:`Message.head`).
MAX_HEAD_OCTETS = 1 << 20
#: The end of the header section: the first empty line (CRLF or LF).
_HEAD_END = re.compile(rb"\r?\n\r?\n")


def _parser() -> BytesParser:
    """The stdlib's lenient parser (``policy=default``). ``email.policy`` and its
    header registry are imported with the first parse, not at start-up (issue 18)."""
    import email.policy
    from email.parser import BytesParser

    return BytesParser(policy=email.policy.default)


@dataclass(eq=False, kw_only=True)
class Message:
    """A retrieved message: its reference, the raw bytes (in memory or spooled), and what
    processors have learnt about it.

    Contract: ``raw`` is never modified; ``record`` is set by the ``parse`` processor;
    ``tags`` are added by filters and seen by later processors and stores.
    """

    ref: MessageRef
    data: bytes | None = None
    spool_path: Path | None = None
    headers_only: bool = False
    tags: set[str] = field(default_factory=set)
    record: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    _sha256: str | None = field(default=None, repr=False)
    _email: EmailMessage | None = field(default=None, repr=False)
    _head: EmailMessage | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.data is None and self.spool_path is None:
            raise ValueError("Message needs data or spool_path")

    @classmethod
    def from_bytes(
        cls, data: bytes, *, mailbox: str = "local", uid: str | None = None
    ) -> Message:
        """Build a message from raw bytes; ``uid`` defaults to ``sha256:<hex>`` of them."""
        digest = hashlib.sha256(data).hexdigest()
        ref = MessageRef(
            mailbox=mailbox, number=0, uid=uid or f"sha256:{digest}", size=len(data)
        )
        return cls(ref=ref, data=data, _sha256=digest)

    @property
    def key(self) -> str:
        """The stable message key used by stores and forwarders for idempotency."""
        return self.ref.key

    @property
    def raw(self) -> bytes:
        """The raw RFC 5322 bytes, exactly as retrieved (dot-unstuffed, CRLF kept)."""
        if self.data is not None:
            return self.data
        assert self.spool_path is not None
        return self.spool_path.read_bytes()

    @property
    def size(self) -> int:
        """Octets actually received (may differ from ``ref.size`` from LIST)."""
        if self.data is not None:
            return len(self.data)
        assert self.spool_path is not None
        return self.spool_path.stat().st_size

    def open(self) -> Any:
        """Open the raw bytes as a binary file object (streams spooled messages)."""
        import io

        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.spool_path is not None
        return self.spool_path.open("rb")

    def hashed(self, hexdigest: str) -> None:
        """Take ``hexdigest`` as :attr:`sha256` when it is not known yet: the hex
        sha256 of every raw byte, from a reader that read them all (``parse`` on a
        spooled message), so that the spool file is not read and hashed again
        (issue 18). Give nothing else: the digest is evidence (see :attr:`sha256`)."""
        if self._sha256 is None:
            self._sha256 = hexdigest

    @property
    def sha256(self) -> str:
        """Hex sha256 of the raw bytes; second evidence beside the UIDL."""
        if self._sha256 is None and self.data is not None:
            self._sha256 = hashlib.sha256(self.data).hexdigest()
        elif self._sha256 is None:
            h = hashlib.sha256()
            with self.open() as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._sha256 = h.hexdigest()
        return self._sha256

    @property
    def email(self) -> EmailMessage:
        """The message parsed leniently by the stdlib (``policy=default``), cached."""
        if self._email is None:
            with self.open() as f:
                parsed = _parser().parse(f)
            assert isinstance(parsed, EmailMessage)
            self._email = parsed
        return self._email

    @property
    def head(self) -> EmailMessage:
        """The header section alone, parsed leniently by the stdlib, cached.

        Reads at most :data:`MAX_HEAD_OCTETS` from the start, up to the first empty
        line, so asking a header of a 200 MB message costs kilobytes, not the message
        (a hostile server cannot exhaust memory through a header lookup). A header
        section longer than that is cut there: fields after the cut read as absent.
        """
        if self._head is None:
            with self.open() as f:
                block = f.read(MAX_HEAD_OCTETS)
            end = _HEAD_END.search(block)
            if end is not None:
                block = block[: end.end()]
            parsed = _parser().parsebytes(block, headersonly=True)
            assert isinstance(parsed, EmailMessage)
            self._head = parsed
        return self._head

    def header(self, name: str) -> str | None:
        """Return the first value of header ``name`` as a string, or None; never raises.

        Uses the whole parsed message when something already parsed it, else only
        the header section (:attr:`head`).
        """
        try:
            value = (self._email if self._email is not None else self.head).get(name)
        except Exception:
            return None
        return None if value is None else str(value)
