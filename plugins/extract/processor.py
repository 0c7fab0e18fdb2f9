"""The `extract` processor: attachment text into ``Attachment.text``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

import structlog
from mailpipe.plugins.parse import PAYLOADS_KEY, parse_into
from mailpipe.plugins.parse.record import Defect
from pydantic import BaseModel, ConfigDict, Field

from mailpipe.processor import ProcessorContext, Result
from mailpipe.units import ByteSize, Duration

from .formats import FORMAT_NAMES, ExtractError, extract, format_of, inflate_cap
from .worker import DEFAULT_MAX_MEMORY, MIN_MAX_MEMORY

if TYPE_CHECKING:
    from mailpipe.message import Message

log = structlog.get_logger()

#: ``Defect.kind`` of an attachment whose text could not be extracted.
EXTRACT_FAILED: Final = "ExtractFailed"
#: ``Defect.kind`` of an attachment passed over for its size.
EXTRACT_SKIPPED: Final = "ExtractSkipped"
#: ``Defect.kind`` of text cut at ``max_chars``.
EXTRACT_TRUNCATED: Final = "ExtractTruncated"

FormatName = Literal["pdf", "docx", "xlsx", "pptx", "odt", "html", "csv", "text"]
ALL_FORMATS: Final[list[FormatName]] = [
    "pdf", "docx", "xlsx", "pptx", "odt", "html", "csv", "text"
]
assert list(FORMAT_NAMES) == ALL_FORMATS


class ExtractOptions(BaseModel):
    """Options of the `extract` processor."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    formats: list[FormatName] = Field(
        default_factory=lambda: list(ALL_FORMATS),
        description="Formats read: pdf, docx, xlsx, pptx, odt (also ods/odp), html, "
        "csv, text. PDF needs pypdf (the `extract` extra).",
    )
    max_size: ByteSize = Field(
        20 * 2**20, gt=0,
        description="Larger attachments are not read (a defect note); e.g. '10MB'."
    )
    max_chars: int = Field(
        200_000, gt=0, strict=True,
        description="Most characters kept per attachment; more is cut (a defect note).",
    )
    timeout: Duration = Field(
        10.0, gt=0,
        description="Time limit per attachment, checked between pages, sheets and "
        "archive members and every 1024 text runs or cells inside one; a PDF's reader "
        "process is killed at it. Past it what was read so far is dropped (a defect "
        "note).",
    )
    max_memory: ByteSize = Field(
        DEFAULT_MAX_MEMORY, ge=MIN_MAX_MEMORY,
        description="Address-space cap (RLIMIT_AS) of the child process that reads "
        "each PDF; at least 128MiB; reaching it is a defect note, e.g. '512MB'.",
    )
    inline: bool = Field(
        False, strict=True, description="Also read inline parts (not only attachments)."
    )


def _bytes(payload: Any) -> bytes:
    return bytes(payload)


class ExtractProcessor:
    """Set ``Attachment.text`` of each attachment in a readable format: PDF, DOCX,
    XLSX, PPTX, ODT/ODS/ODP, HTML, CSV and plain text.

    Limits per attachment: ``max_size`` octets read, ``max_chars`` characters kept,
    ``timeout`` seconds; a PDF is read in a child process whose address space is
    capped at ``max_memory`` octets and which is killed at ``timeout``; an archive
    inflates at most 8 octets per ``max_chars`` character (at least 64 KiB, at most
    64 MiB). Readers parse the given
    bytes and open no file or connection (no network). A failed, skipped or cut
    extraction is a defect note on the record (``ExtractFailed``, ``ExtractSkipped``,
    ``ExtractTruncated``), never an exception. ``store.sqlite`` indexes the text for
    full-text search. Parses first when no step did.
    """

    name: ClassVar[str] = "extract"
    Options: ClassVar[type[BaseModel]] = ExtractOptions
    commits: ClassVar[bool] = False
    transparent: ClassVar[bool] = True  # never decides; header prefetch skips it
    concurrent: ClassVar[bool] = True

    def __init__(self, options: ExtractOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context

    def process(self, message: Message) -> Result:
        """Fill ``Attachment.text``; always continues."""
        o = self.options
        record = parse_into(message)
        payloads = message.meta.get(PAYLOADS_KEY) or []
        for att, payload in zip(record.attachments, payloads, strict=False):
            if att.text is not None or (att.inline and not o.inline):
                continue
            fmt = format_of(att.content_type, att.filename)
            if fmt is None or fmt.name not in o.formats:
                continue
            if att.size > o.max_size:
                record.defects.append(Defect(
                    part=att.part, kind=EXTRACT_SKIPPED,
                    detail=f"{fmt.name} attachment {att.index} of {att.size} octets "
                    f"is over max_size ({o.max_size}); text not extracted"))
                continue
            started = time.perf_counter()
            try:
                text, truncated = extract(fmt, _bytes(payload), max_chars=o.max_chars,
                                          timeout=o.timeout, max_memory=o.max_memory)
            except ExtractError as exc:
                record.defects.append(Defect(
                    part=att.part, kind=EXTRACT_FAILED,
                    detail=f"{fmt.name} attachment {att.index}: {exc}"))
                continue
            att.text = text
            if truncated:
                record.defects.append(Defect(
                    part=att.part, kind=EXTRACT_TRUNCATED,
                    detail=f"attachment {att.index}: text cut at {o.max_chars} "
                    "characters (max_chars) or at the archive's inflation cap "
                    f"({inflate_cap(o.max_chars)} octets)"))
            log.debug("attachment_text_extracted", key=message.key, index=att.index,
                      format=fmt.name, chars=len(text),
                      ms=round((time.perf_counter() - started) * 1000, 1))
        return None
