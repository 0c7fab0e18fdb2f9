"""Server-made wrappers: a POP3 server's notice that carries the original message.

RFC 6856 §3: a POP3 server holding a message with 8-bit (UTF-8) headers may, for a
client that has not sent ``UTF8``, serve a notice instead, with the original inside a
``message/global`` part (RFC 6532 §3.7). Courier does; its notice, captured from
Courier 1.0.16 (tests/data/parse/courier_notice_*.eml), is::

    From: Mail Delivery Subsystem <postmaster>
    Subject: Cannot display Unicode content
    Mime-Version: 1.0
    Content-Type: multipart/mixed; boundary="=_36-1796395334"

    --=_36-1796395334
    Content-Type: text/plain

    This E-mail message was determined to be Unicode-formatted ...
    --=_36-1796395334
    Content-Type: message/global

    <the original, 8-bit headers and all>
    --=_36-1796395334--

:func:`find_wrapped` recognises only such notices, conservatively, so that a message a
person forwarded as an attachment, or any mail that reached the mailbox through an
MTA, is never taken for one. All of these must hold:

* the top-level header fields are exactly those of a known notice shape
  (:data:`SHAPES`): same names, nothing more (no Received, Return-Path, Date,
  Message-ID, ... which every MTA or mail client adds), and the same Subject;
* the body is ``multipart/mixed`` with exactly two parts: a ``text/plain`` notice
  without a file name or ``attachment`` disposition, then a ``message/global`` or
  ``message/rfc822`` part that the parser has parsed (not transfer-encoded);
* the carried message has 8-bit octets in a header field, its own or a MIME part's:
  the reason a server wraps at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Any, Final

from .record import SERVER_WRAPPED

__all__ = [
    "SERVER_WRAPPED",
    "SHAPES",
    "Wrapped",
    "WrapperShape",
    "find_wrapped",
    "header_block_shape",
    "headers_only_detail",
    "match_shape",
]

_CARRIERS = frozenset({"message/global", "message/rfc822"})
#: Parts of the carried message looked at for 8-bit headers; past it: not a wrapper.
_MAX_INNER_PARTS = 5000


@dataclass(frozen=True, slots=True)
class WrapperShape:
    """The top-level header block of one server's notice."""

    server: str
    subject: str
    fields: frozenset[str]  # lower-case field names, exactly these (any order)


#: Known notice shapes. Only Courier's is known (1.0.16, RFC 6856 §3).
SHAPES: Final = (
    WrapperShape(
        server="courier",
        subject="Cannot display Unicode content",
        fields=frozenset({"from", "subject", "mime-version", "content-type"}),
    ),
)


@dataclass(frozen=True, slots=True)
class Wrapped:
    """A recognised wrapper: the carried original and where it is in the notice."""

    shape: WrapperShape
    inner: Message  # the original, as parsed inside the carrier part
    part: str  # IMAP-style path of the carrier part, e.g. "2"
    content_type: str  # message/global or message/rfc822

    def detail(self) -> str:
        """The ``Defect.detail`` that says what was unwrapped."""
        return (
            f"{self.shape.server} notice {self.shape.subject!r} (RFC 6856 §3): this "
            f"record describes the original carried in part {self.part} "
            f"({self.content_type}); the raw bytes are the notice as received"
        )


def headers_only_detail(shape: WrapperShape) -> str:
    """The ``Defect.detail`` for a header block (``TOP n 0``) that is a notice's."""
    return (
        f"{shape.server} notice {shape.subject!r} (RFC 6856 §3), header block only: "
        "this record describes the notice; the original is in its body"
    )


def header_block_shape(msg: Message) -> WrapperShape | None:
    """The notice shape of a header block alone (``TOP n 0``: the body is empty), or
    None. Whether the original is inside cannot be told from it, so a caller that
    decides on headers should wait for the whole message."""
    payload = _payload(msg)
    if isinstance(payload, list) or (payload or "").strip():
        return None
    return match_shape(msg)


def match_shape(msg: Message) -> WrapperShape | None:
    """The notice shape whose header block ``msg``'s top-level header block is, or
    None. Looks at header fields only, so it works on a ``TOP n 0`` header block."""
    try:
        names = [str(name).lower() for name in msg]
        subject = msg.get("subject")
        ctype = msg.get_content_type()
    except Exception:
        return None
    if ctype != "multipart/mixed" or subject is None:
        return None
    for shape in SHAPES:
        if (
            len(names) == len(shape.fields)
            and set(names) == shape.fields
            and str(subject).strip() == shape.subject
        ):
            return shape
    return None


def find_wrapped(msg: Message) -> Wrapped | None:
    """The original carried in ``msg`` when ``msg`` is a server's notice (see the
    module docstring for the exact rules), else None. Never raises."""
    try:
        return _find(msg)
    except Exception:
        return None


def _find(msg: Message) -> Wrapped | None:
    shape = match_shape(msg)
    if shape is None:
        return None
    parts = _payload(msg)
    if not isinstance(parts, list) or len(parts) != 2:
        return None
    notice, carrier = parts
    if not isinstance(notice, Message) or not isinstance(carrier, Message):
        return None
    if (
        notice.get_content_type() != "text/plain"
        or notice.get_filename() is not None
        or notice.get_content_disposition() == "attachment"
        or isinstance(_payload(notice), list)
    ):
        return None
    ctype = carrier.get_content_type()
    inner = _payload(carrier)
    if ctype not in _CARRIERS or not isinstance(inner, list) or len(inner) != 1:
        return None
    original = inner[0]
    if not isinstance(original, Message) or not _has_8bit_headers(original):
        return None
    return Wrapped(shape=shape, inner=original, part="2", content_type=ctype)


def _payload(part: Message) -> Any:
    return getattr(part, "_payload", None)


def _parts(root: Message) -> Iterator[Message]:
    """``root`` and every part below it, iteratively (at most _MAX_INNER_PARTS)."""
    stack = [root]
    seen = 0
    while stack and seen < _MAX_INNER_PARTS:
        part = stack.pop()
        seen += 1
        yield part
        payload = _payload(part)
        if isinstance(payload, list):
            stack.extend(p for p in reversed(payload) if isinstance(p, Message))


def _has_8bit_headers(root: Message) -> bool:
    """True when a header field of ``root`` or of a part below it holds 8-bit octets
    (the byte parser keeps them as surrogate escapes, never as code points > 127)."""
    for part in _parts(root):
        for name, value in part.raw_items():
            if not str(name).isascii() or not str(value).isascii():
                return True
    return False
