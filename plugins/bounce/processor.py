"""The `bounce` processor: sets ``record.bounce`` for delivery reports."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar, Final

from mailpipe.plugins.parse import PAYLOADS_KEY, parse_into
from pydantic import BaseModel, ConfigDict, Field

from mailpipe.processor import ProcessorContext, Result

from .dsn import parse_delivery_status
from .nonstandard import FLUFL_MAX, parse_nonstandard

if TYPE_CHECKING:
    from mailpipe.message import Message

_STATUS_TYPES: Final = frozenset(
    {"message/delivery-status", "message/global-delivery-status"}
)
_HEADER_TYPES: Final = frozenset(
    {"text/rfc822-headers", "message/rfc822-headers", "message/rfc822",
     "message/global", "message/global-headers"}
)
_MESSAGE_ID: Final = re.compile(rb"(?im)^message-id:[ \t]*<?([^\s<>]+)>?")
#: Octets of a report part read; delivery-status parts are a few KiB.
MAX_REPORT: Final = 1 << 20


class BounceOptions(BaseModel):
    """Options of the `bounce` processor."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    nonstandard: bool = Field(
        True,
        strict=True,
        description="Also recognise bounces without an RFC 3464 delivery-status part "
        "(by mailer-daemon sender or bounce subject); recipients need flufl.bounce "
        "(the `bounce` extra).",
    )


def _head(message: Message, limit: int) -> bytes:
    """The first ``limit`` octets of the message (a spooled one is not read whole)."""
    with message.open() as stream:
        data: bytes = stream.read(limit)
    return data


def _bytes(payload: Any, limit: int = MAX_REPORT) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload[:limit])
    chunks = getattr(payload, "chunks", None)
    if chunks is None:
        return b""
    out = bytearray()
    for chunk in chunks():
        out += chunk
        if len(out) >= limit:
            break
    return bytes(out[:limit])


class BounceProcessor:
    """Set ``record.bounce`` when the message is a delivery report: an RFC 3464
    ``message/delivery-status`` part anywhere in it (whatever the container), or a
    non-standard notice from a mailer daemon. Failed recipients, their actions,
    status codes and diagnostics, the reporting MTA and the Message-ID of the
    bounced message (from its returned copy or headers).

    Read receipts (MDN) and abuse reports (ARF) are not bounces. Auto-replies stay
    as they are (``record.auto_reply``); see the ``loopguard`` processor. Never
    fails; never stops the chain. Parses first when no step did.
    """

    name: ClassVar[str] = "bounce"
    Options: ClassVar[type[BaseModel]] = BounceOptions
    commits: ClassVar[bool] = False
    transparent: ClassVar[bool] = True  # never decides; header prefetch skips it
    concurrent: ClassVar[bool] = True

    def __init__(self, options: BounceOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context

    def process(self, message: Message) -> Result:
        """Set ``record.bounce`` (None for other mail); always continues."""
        record = parse_into(message)
        payloads = message.meta.get(PAYLOADS_KEY) or []
        statuses: list[str] = []
        original: str | None = None
        for att, payload in zip(record.attachments, payloads, strict=False):
            if att.content_type in _STATUS_TYPES:
                statuses.append(_bytes(payload).decode("utf-8", "replace"))
            elif att.content_type in _HEADER_TYPES and original is None:
                m = _MESSAGE_ID.search(_bytes(payload, 65536))
                original = m.group(1).decode("utf-8", "replace") if m else None
        bounce = parse_delivery_status(statuses) if statuses else None
        if bounce is None and self.options.nonstandard and not message.headers_only:
            bounce = parse_nonstandard(record, lambda: _head(message, FLUFL_MAX))
        if bounce is not None:
            bounce.original_message_id = original
        record.bounce = bounce
        return None
