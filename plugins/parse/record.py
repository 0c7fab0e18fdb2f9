"""MessageRecord: the versioned structured message that stores and forwarders share."""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from .desk import Bounce, Envelope, TicketKeys

#: Bump when a field changes meaning or is removed; adding an optional field does not.
SCHEMA_VERSION: Literal[1] = 1

#: ``Defect.kind`` of a message that a POP3 server served wrapped in a notice (RFC 6856
#: §3, e.g. Courier's "Cannot display Unicode content"); see ``wrapper.py``.
SERVER_WRAPPED: Final = "ServerWrapped"

#: ``Defect.kind`` of a body part of which only a prefix is in ``text`` or ``html``
#: (the ``parse`` option ``max_body_size``); the raw message holds it whole.
BODY_TRUNCATED: Final = "BodyTruncated"

AttachmentSource = Literal["mime", "uuencode", "tnef", "rfc822", "smime", "msg"]


class Address(BaseModel):
    """One mailbox: display name (RFC 2047 decoded) and address (IDN decoded)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(default="", description="Display name, decoded; may be empty.")
    address: str = Field(
        description="addr-spec as local@domain, the domain IDNA-decoded to Unicode; "
        "may be empty for a group or an unparseable entry."
    )

    def __str__(self) -> str:
        return f"{self.name} <{self.address}>" if self.name else self.address


class Attachment(BaseModel):
    """One attachment or inline part; its bytes are in meta["attachment_payloads"]."""

    index: int = Field(description="Position in the attachment list (0-based).")
    filename: str | None = Field(
        default=None, description="File name (RFC 2231/2047 decoded) or None."
    )
    content_type: str = Field(description="Lower-case MIME type, e.g. application/pdf.")
    disposition: str | None = Field(
        default=None, description="'attachment', 'inline' or None when not declared."
    )
    size: int = Field(description="Decoded size in octets.")
    sha256: str = Field(description="Hex sha256 of the decoded bytes.")
    content_id: str | None = Field(default=None, description="Content-ID without <>.")
    inline: bool = Field(
        default=False, description="True for inline parts (e.g. cid: images)."
    )
    part: str = Field(description="MIME part path like '1.2' ('' = whole message).")
    source: AttachmentSource = Field(
        default="mime",
        description="Where it came from: a MIME part, a uuencoded block, a TNEF "
        "winmail.dat, a nested message/rfc822, or (the `unwrap` processor) an "
        "opaque-signed S/MIME message or an Outlook .msg item.",
    )
    text: str | None = Field(
        default=None,
        description="Extracted text (the `extract` processor), capped; None when "
        "not extracted.",
    )


class Defect(BaseModel):
    """Something wrong in the message; parsing went on and the raw bytes remain."""

    part: str = Field(description="MIME part path ('' for the top level).")
    kind: str = Field(description="Short name, e.g. StartBoundaryNotFoundDefect.")
    detail: str = Field(default="", description="Human-readable detail.")


class MessageRecord(BaseModel):
    """A parsed message (schema version 1).

    Contract: produced by the ``parse`` processor and :func:`parse_message`, which never
    raise on any input. ``date`` is timezone-aware UTC or None (``date_raw`` keeps the
    header as received). ``text``/``html`` are decoded bodies; ``text_from_html`` is
    True when ``text`` was rendered from an HTML-only message. ``tags`` is a snapshot
    taken at parse time (filters add to ``message.tags`` afterwards). ``headers`` are
    (name, decoded value) pairs in order.

    A message that a POP3 server served wrapped in a notice (RFC 6856 §3) is described
    by the original it carries, with ``sha256`` and ``size`` of the raw bytes as
    received and a defect of kind ``ServerWrapped``; see :attr:`server_wrapped`.
    """

    schema_version: Literal[1] = Field(default=1, description="Record schema version.")
    key: str = Field(default="", description="Stable message key (message_key()).")
    mailbox: str = Field(default="", description="Mailbox the message came from.")
    uid: str = Field(default="", description="Server UIDL (or content hash).")
    sha256: str = Field(default="", description="Hex sha256 of the raw bytes.")
    size: int = Field(default=0, description="Raw size in octets.")
    message_id: str | None = Field(default=None, description="Message-ID without <>.")
    date: datetime | None = Field(default=None, description="Date header in UTC.")
    date_raw: str | None = Field(default=None, description="Date header as received.")
    from_addresses: list[Address] = Field(default_factory=list, description="From.")
    sender: list[Address] = Field(default_factory=list, description="Sender.")
    reply_to: list[Address] = Field(default_factory=list, description="Reply-To.")
    to: list[Address] = Field(default_factory=list, description="To.")
    cc: list[Address] = Field(default_factory=list, description="Cc.")
    bcc: list[Address] = Field(default_factory=list, description="Bcc.")
    subject: str | None = Field(default=None, description="Subject, RFC 2047 decoded.")
    in_reply_to: list[str] = Field(default_factory=list, description="In-Reply-To.")
    references: list[str] = Field(default_factory=list, description="References.")
    thread_key: str = Field(
        default="",
        description="Conversation key for ticketing: 32 hex digits of sha256 over the "
        "thread root (the first References id, else In-Reply-To, else the Message-ID, "
        "else the subject without Re:/Fwd:/[list] prefixes, else the raw bytes).",
    )
    list_id: str | None = Field(default=None, description="List-Id (inside <>).")
    auto_reply: bool = Field(default=False, description="Automatically generated.")
    auto_reply_reason: str | None = Field(
        default=None, description="Why, e.g. auto-submitted: auto-replied."
    )
    text: str | None = Field(default=None, description="Plain-text body.")
    html: str | None = Field(default=None, description="HTML body.")
    text_from_html: bool = Field(default=False, description="text rendered from html.")
    attachments: list[Attachment] = Field(default_factory=list, description="Files.")
    defects: list[Defect] = Field(default_factory=list, description="Defects found.")
    tags: list[str] = Field(default_factory=list, description="Tags at parse time.")
    headers: list[tuple[str, str]] = Field(
        default_factory=list, description="All header fields, decoded, in order."
    )
    reply: str | None = Field(
        default=None,
        description="The new text of a reply without quoted history and signature "
        "(the `reply` processor); None when not computed.",
    )
    ticket: TicketKeys | None = Field(
        default=None, description="Ticket and thread keys (the `ticket` processor)."
    )
    bounce: Bounce | None = Field(
        default=None, description="The delivery report (the `bounce` processor)."
    )
    envelopes: list[Envelope] = Field(
        default_factory=list,
        description="S/MIME, PGP/MIME, TNEF and .msg wrappers (the `unwrap` processor).",
    )

    @property
    def server_wrapped(self) -> bool:
        """True when a ``ServerWrapped`` defect says a POP3 server wrapped the message
        in a notice: with a body, the record describes the original it carries (the
        defect's part is the carrier's); for a header block alone (part ``""``), it
        describes the notice. Not a field: the JSON shape is unchanged."""
        return any(d.kind == SERVER_WRAPPED for d in self.defects)
