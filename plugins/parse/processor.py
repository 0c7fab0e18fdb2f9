"""The `parse` processor: sets message.record and meta["attachment_payloads"]."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
from pydantic import BaseModel, ConfigDict, Field

from mailpipe.processor import LATER, ProcessorContext, Result
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

#: The parser's module: loaded by the first parse (see process_nowait).
_PARSER = f"{__package__}.parser"

#: Modules a parse may import lazily (charset detection, TNEF, file types): the
#: first process() loads them on the step's thread (:func:`_preload`), so that
#: process_nowait never imports from disk on the event loop (S-12).
_LAZY: tuple[str, ...] = (_PARSER, "charset_normalizer", "tnefparse", "mimetypes")
_preloaded = False


def _preload() -> None:
    """Import what a parse may import lazily (on the step's thread; once)."""
    global _preloaded
    if _preloaded:
        return
    import codecs
    import importlib
    import mimetypes
    from encodings.aliases import aliases

    from . import parser  # noqa: F401

    for name in _LAZY[1:]:
        try:
            importlib.import_module(name)
        except ImportError:  # pragma: no cover - dependencies
            pass
    mimetypes.init()  # reads the system's mime.types files
    # Every codec module (~100, ~35 ms once): a charset label or the charset
    # detector (which tries all it supports) would import it on first use.
    try:
        from charset_normalizer.constant import IANA_SUPPORTED
    except ImportError:  # pragma: no cover - a dependency
        IANA_SUPPORTED = []
    for name in {*aliases.values(), *IANA_SUPPORTED}:
        try:
            codecs.lookup(name)
        except LookupError:  # pragma: no cover - a codec the platform lacks
            pass
    _preloaded = True


def _utf8(data: bytes) -> bool:
    """True when ``data`` is valid UTF-8 (ASCII included; ~1 µs for 4 KiB)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


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
        _preload()
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

    #: The largest in-memory message :meth:`process_nowait` parses on the event loop,
    #: with at most so many lines starting ``--`` (MIME boundaries: ~40 µs a part)
    #: and ``@`` (addresses: ~7 µs each in a header). Parsing costs 20-250 ns an
    #: octet by the message's shape (plain text the least; HTML, many parts, long
    #: address lists the most): ~0.1 ms for 4 KB of plain text, ~0.6 ms for the
    #: shapes of bench/RESULTS.md §35. Hostile shapes within these bounds cost up
    #: to ~3 ms (review r-e2e): 7 parts of mislabelled 8-bit text, each run through
    #: charset detection (~0.35 ms a part), or ~1000 addresses without ``@`` in
    #: 4 KiB (~2.7 ms). Anything else is parsed on the step's thread, where the
    #: hand-over costs little beside the parse and the processing_budget applies.
    NOWAIT_OCTETS: ClassVar[int] = 4 << 10
    NOWAIT_BOUNDARIES: ClassVar[int] = 8
    NOWAIT_ATS: ClassVar[int] = 32
    #: At most so many ``=?`` (encoded words): each names a charset, and one Python
    #: does not know costs a codec search on disk (~15 µs) however often it is sent.
    NOWAIT_WORDS: ClassVar[int] = 64
    #: Whether a message of bytes that are not UTF-8 is parsed on the loop (no:
    #: each 8-bit header line of them runs charset detection, ~0.3 ms).
    NOWAIT_NOT_UTF8: ClassVar[bool] = False

    def process_nowait(self, message: Message) -> object:
        """:meth:`process` on the event loop for a small in-memory message once the
        parser is loaded (issue 18): the same record, payloads, defects and log line,
        without the hand-over to the step's thread and back. A spooled message, one
        past a NOWAIT_* bound, or the first one (the parser's modules are imported
        then, from disk) returns ``LATER`` having changed nothing, and
        :meth:`process` runs on the step's thread.

        Lines are counted as the parser splits them: a bare CR ends a line too, so
        ``\\r--`` starts a boundary line as ``\\n--`` does (S-12). Until process()
        has loaded every module a parse may import lazily (:func:`_preload`), a
        message is left to the step's thread. So is one whose bytes are not UTF-8: only
        such bytes lead to charset detection (~0.3 ms each time), which every
        8-bit header line would run (S-12)."""
        data = message.data
        if (
            data is None
            or len(data) > self.NOWAIT_OCTETS
            or not _preloaded
            or _PARSER not in sys.modules
            or data.count(b"\n--") + data.count(b"\r--") + data.startswith(b"--")
            > self.NOWAIT_BOUNDARIES
            or data.count(b"@") > self.NOWAIT_ATS
            or data.count(b"=?") > self.NOWAIT_WORDS
            or not (self.NOWAIT_NOT_UTF8 or _utf8(data))
        ):
            return LATER
        return self.process(message)

    def prefetch(self, message: Message) -> Result:
        """Parse the header block so later prefetching steps can use the record."""
        parse_into(message, max_body=self.options.max_body_size)
        return None
