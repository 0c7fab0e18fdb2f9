"""The `parse` processor: sets message.record and meta["attachment_payloads"]."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
from pydantic import BaseModel, ConfigDict, Field

from mailpipe.processor import ProcessorContext, Result
from mailpipe.units import ByteSize

if TYPE_CHECKING:
    from mailpipe.message import Message

    from .record import MessageRecord

# The parser (email, the record's dataclasses, many patterns) is imported when the
# first message is parsed, not when a configuration naming `parse` starts: a run that
# finds no new mail never pays for it (issue 18).

#: The default ``max_body_size``; the parser's own default (parser.MAX_BODY) is the same.
MAX_BODY = 1 << 20

log = structlog.get_logger()

#: Key in ``message.meta`` of the attachment bytes, aligned with record.attachments.
PAYLOADS_KEY = "attachment_payloads"


class ParseOptions(BaseModel):
    """Options of the `parse` processor."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    max_body_size: ByteSize = Field(
        MAX_BODY,
        gt=0,
        description="Most octets of text/plain body parts, and again of text/html "
        "ones, decoded into the record's text and html; past it a part is cut at a "
        "line end with a BodyTruncated defect (the stores keep the raw message whole).",
    )


def parse_into(message: Message, *, max_body: int = MAX_BODY) -> MessageRecord:
    """Parse ``message`` (if not done yet) and return its record; never raises."""
    from .record import MessageRecord

    record = message.record
    if isinstance(record, MessageRecord) and (
        message.headers_only or not message.meta.get("parsed_headers_only", False)
    ):
        return record
    record, payloads = parse_raw(message, max_body=max_body)
    if message.headers_only:
        record.size = message.ref.size  # the LIST size; raw is only the header block
    record.tags = sorted(message.tags)
    message.record = record
    message.meta[PAYLOADS_KEY] = payloads
    message.meta["parsed_headers_only"] = message.headers_only
    return record


def parse_raw(
    message: Message, *, max_body: int = MAX_BODY
) -> tuple[MessageRecord, list[Any]]:
    """Parse ``message``'s raw bytes: from its spool file with bounded memory (large
    attachments become SpooledPayloads beside it), else from memory."""
    from .parser import parse_file, parse_message

    ids = {"key": message.key, "mailbox": message.ref.mailbox, "uid": message.ref.uid}
    if message.spool_path is not None and not message.headers_only:
        with message.open() as f:
            record, found = parse_file(
                f, spool_dir=message.spool_path.parent, max_body=max_body, **ids
            )
        # parse_file hashed every octet of the file it read: the stores and the
        # ledger read the message's sha256 without reading the file again (issue 18).
        if record.sha256:
            message.hashed(record.sha256)
        return record, found
    # The message's sha256 (cached; the ledger and the stores read it too): the raw
    # bytes are hashed once, not once more for the record (issue 18).
    record, payloads = parse_message(
        message.raw, max_body=max_body, sha256=message.sha256, **ids
    )
    return record, list(payloads)


class ParseProcessor:
    """Turn the raw message into a :class:`MessageRecord` (never fails on bad mail).

    Sets ``message.record`` and ``message.meta["attachment_payloads"]`` (bytes aligned
    with ``record.attachments``; a large base64 attachment of a spooled message is a
    :class:`~.spool.SpooledPayload` instead: ``len()``, ``.sha256``, ``.chunks()``,
    ``bytes()``). At most ``max_body_size`` octets of text/plain body parts, and as
    many of text/html ones, go into the record (a BodyTruncated defect says where). Works on headers-only messages (``TOP n 0``) too. A notice a POP3
    server served in place of a message with 8-bit headers (RFC 6856 §3) gives the
    record of the original it carries, with a ``ServerWrapped`` defect (see
    ``wrapper.py``); ``message.raw`` is never changed.
    """

    name: ClassVar[str] = "parse"
    Options: ClassVar[type[BaseModel]] = ParseOptions
    commits: ClassVar[bool] = False
    header_only: ClassVar[bool] = False
    transparent: ClassVar[bool] = True  # never decides; header prefetch skips it
    # No state between calls: messages of several mailboxes are parsed at once, so
    # one long parse (on its worker thread) never holds up another mailbox's.
    concurrent: ClassVar[bool] = True

    def __init__(self, options: ParseOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context

    def process(self, message: Message) -> Result:
        """Parse the message; always continues the chain."""
        started = time.perf_counter()
        message.record = None
        record = parse_into(message, max_body=self.options.max_body_size)
        if record.defects:
            log.debug(
                "message_parsed_with_defects",
                key=message.key,
                defects=len(record.defects),
                kinds=sorted({d.kind for d in record.defects})[:10],
                ms=round((time.perf_counter() - started) * 1000, 1),
            )
        return None

    def prefetch(self, message: Message) -> Result:
        """Parse the header block so later prefetching steps can use the record."""
        parse_into(message, max_body=self.options.max_body_size)
        return None
