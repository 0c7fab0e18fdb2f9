"""parse_message: raw RFC 5322 bytes to a MessageRecord plus attachment bytes, never raising."""

from __future__ import annotations

import binascii
import hashlib
import io
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import Message
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, Final

import structlog
from pydantic import BaseModel

from . import autoreply
from .addresses import parse_addresses
from .attachments import (
    TNEF_TYPES,
    Extracted,
    expand_tnef,
    extract_uuencoded,
    filename_of,
    has_uuencoded,
)
from .body import BodyParts, cut_body, html_charset
from .charsets import decode_text
from .headers import decode_header, param
from .record import (
    BODY_TRUNCATED,
    SERVER_WRAPPED,
    Address,
    Attachment,
    AttachmentSource,
    Defect,
    MessageRecord,
)
from .spool import RunDecoder, Runs, SpooledPayload, SpoolWriter, skeleton
from .transfer import CopyDecoder, QpDecoder
from .wrapper import find_wrapped, header_block_shape, headers_only_detail

log = structlog.get_logger()

_PARSER = BytesParser(policy=email_policy.compat32)
_HEADERS_PARSER = BytesParser(policy=email_policy.compat32)
_ANGLE_ID = re.compile(r"<([^<>]*)>")
_SUBJECT_PREFIX = re.compile(
    r"^(?:\s*(?:re|fwd?|aw|wg|sv|vs|antw|rif|r|tr|odp|ynt|res|enc)\s*(?:\[\d+\])?\s*[:\uff1a]"
    r"|\s*\[[^\]]*\])+",
    re.I,
)
_NOT_B64 = re.compile(rb"[^A-Za-z0-9+/]")
_MAX_DEPTH = 40
#: parse_message parses messages of at least this many octets from their skeleton,
#: eliding runs of at least _ELIDE_RUN octets (see _message).
_ELIDE_FROM: Final = 64 * 1024
_ELIDE_RUN: Final = 16 * 1024
#: ... and stops eliding past this many octets of header blocks (a message of many
#: nested messages, or of huge headers, would have them parsed twice for nothing).
_ELIDE_HEADERS: Final = 64 * 1024
#: The most parts one message may yield, of every kind together: MIME parts (the
#: containers included), uuencoded blocks and TNEF files. Past it the rest is kept
#: raw (in the message bytes, or left in the body text) and one TooManyParts defect
#: is recorded; ``store.attachments`` applies the same cap to what it is given.
MAX_PARTS: Final = 5000
#: The most octets of text/plain body parts, and again of text/html ones, decoded into
#: one record's ``text`` and ``html`` (the ``parse`` option ``max_body_size``); past
#: it a part is cut (at a line end) and a BodyTruncated defect recorded. The raw
#: message, which the stores keep whole, holds the rest.
MAX_BODY: Final = 1 << 20
_ADDRESS_FIELDS = (
    ("from_addresses", "from"),
    ("sender", "sender"),
    ("reply_to", "reply-to"),
    ("to", "to"),
    ("cc", "cc"),
    ("bcc", "bcc"),
)
_UU_TYPES = frozenset({"x-uuencode", "uuencode", "x-uue", "uue"})


@dataclass
class _State:
    defects: list[Defect] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    payloads: list[bytes | SpooledPayload] = field(default_factory=list)
    body: BodyParts = field(default_factory=BodyParts)
    hint: str | None = None
    hint_part: Message | None = None  # the part whose charset the hint is
    runs: Runs | None = None  # parse_file: the base64 runs elided from the skeleton
    parts: int = 0  # parts of every kind counted against MAX_PARTS
    over: bool = False  # the TooManyParts defect is recorded
    max_body: int = MAX_BODY  # see MAX_BODY
    body_left: dict[str, int] = field(default_factory=dict)  # by "text" / "html"

    def defect(self, part: str, kind: str, detail: str) -> None:
        self.defects.append(Defect(part=part, kind=kind, detail=detail[:500]))

    def room(self) -> int:
        """How many more parts fit under :data:`MAX_PARTS`."""
        return max(0, MAX_PARTS - self.parts)

    def take(self, part: str) -> bool:
        """Count one part; False (and one TooManyParts defect) once over the cap."""
        self.parts += 1
        if self.parts <= MAX_PARTS:
            return True
        if not self.over:
            self.over = True
            self.defect(
                part, "TooManyParts", f"more than {MAX_PARTS} parts; rest kept raw"
            )
        return False

    def attach(
        self,
        data: bytes | SpooledPayload,
        *,
        part: str,
        filename: str | None,
        content_type: str,
        disposition: str | None = None,
        content_id: str | None = None,
        inline: bool = False,
        source: AttachmentSource = "mime",
    ) -> None:
        self.attachments.append(
            Attachment(
                index=len(self.attachments),
                filename=filename,
                content_type=content_type,
                disposition=disposition,
                size=len(data),
                sha256=(
                    data.sha256
                    if isinstance(data, SpooledPayload)
                    else hashlib.sha256(data).hexdigest()
                ),
                content_id=content_id,
                inline=inline,
                part=part,
                source=source,
            )
        )
        self.payloads.append(data)


def parse_message(
    raw: bytes,
    *,
    key: str = "",
    mailbox: str = "",
    uid: str = "",
    max_body: int = MAX_BODY,
    sha256: str | None = None,
) -> tuple[MessageRecord, list[bytes]]:
    """Parse raw message bytes; return the record and the attachment bytes (aligned).

    Never raises on any input: what cannot be decoded becomes a :class:`Defect`, and
    the raw bytes stay with the caller. A headers-only input (``TOP n 0``) gives a
    record with headers and no body.

    A POP3 server's notice that carries the original (RFC 6856 §3; see
    :mod:`.wrapper`) gives a record of the original: its headers, body and
    attachments (part paths under the carrier part, e.g. ``2.1``), ``sha256`` and
    ``size`` of the raw bytes as received, and a first defect of kind
    ``ServerWrapped`` (``record.server_wrapped``). A headers-only notice gives a
    record of the notice with that defect (part ``""``): the original is in the body.

    At most ``max_body`` octets of text/plain body parts, and as many of text/html
    ones, are decoded into ``text`` and ``html`` (see :data:`MAX_BODY`).

    ``sha256`` is the hex sha256 of ``raw`` when the caller has it (taken as given,
    the record's ``sha256``); None: computed here.
    """
    base = {
        "key": key,
        "mailbox": mailbox,
        "uid": uid,
        "sha256": hashlib.sha256(raw).hexdigest() if sha256 is None else sha256,
        "size": len(raw),
    }
    try:
        return _parse(raw, base, max_body)
    except Exception as exc:  # last resort: keep what the headers give
        defect = Defect(
            part="", kind="ParseFailed", detail=f"{type(exc).__name__}: {exc}"
        )
        try:
            msg = _HEADERS_PARSER.parsebytes(raw, headersonly=True)
            record, _ = _record(msg, base, _State(), body=False)
        except Exception:
            record = MessageRecord(**base)
        record.defects.append(defect)
        return record, []


def parse_file(
    f: IO[bytes],
    *,
    key: str = "",
    mailbox: str = "",
    uid: str = "",
    spool_dir: Path | None = None,
    max_body: int = MAX_BODY,
) -> tuple[MessageRecord, list[bytes | SpooledPayload]]:
    """Parse the message in binary seekable file ``f`` with memory bounded by its
    small parts and ``max_body``.

    The same result as :func:`parse_message` on the file's bytes, except that an
    attachment held in long runs of body lines (see :mod:`.spool`) is decoded into a
    :class:`SpooledPayload` in ``spool_dir`` instead of ``bytes`` (and a long body
    part is decoded there before its first ``max_body`` octets are read). ``f`` must
    stay open until this returns. Never raises on any input (I/O errors aside).
    """
    sk = skeleton(f)
    if not sk.runs:  # sk.data is every octet of f, which sk.sha256 hashed (issue 18)
        record, payloads = parse_message(
            sk.data, key=key, mailbox=mailbox, uid=uid, max_body=max_body,
            sha256=sk.sha256,
        )
        return record, list(payloads)
    base = {"key": key, "mailbox": mailbox, "uid": uid, "sha256": sk.sha256,
            "size": sk.size}
    runs = Runs(sk, f, spool_dir)
    try:
        msg = _PARSER.parsebytes(sk.data)
        wrapped = find_wrapped(msg)  # only the original is walked: inflate it alone
        _inflate_outside_leaves(wrapped.inner if wrapped else msg, runs)
        state = _State(runs=runs, max_body=max_body)
        record, found = _record(msg, base, state, body=True)
        return record, list(found)
    except Exception as exc:  # last resort, as in parse_message
        record, _ = parse_message(b"", key=key, mailbox=mailbox, uid=uid)
        record = record.model_copy(update={"sha256": sk.sha256, "size": sk.size})
        record.defects = [
            Defect(part="", kind="ParseFailed", detail=f"{type(exc).__name__}: {exc}")
        ]
        return record, []


def _inflate_outside_leaves(root: Message, runs: Runs, *, leaves: bool = False) -> None:
    """Put the elided text back in preambles, epilogues and nested messages (which
    are serialised whole); leaves keep their markers for _leaf to decode from the
    file, unless ``leaves`` (then every marker is replaced)."""
    stack: list[tuple[Message, bool]] = [(root, leaves)]
    while stack:
        part, whole = stack.pop()
        for attr in ("preamble", "epilogue"):
            value = getattr(part, attr, None)
            if isinstance(value, str) and runs.has(value):
                setattr(part, attr, runs.inflate(value))
        payload = _payload(part)
        if isinstance(payload, list):
            nested = whole or not _content_type(part).startswith("multipart/")
            stack.extend((c, nested) for c in payload if isinstance(c, Message))
        elif whole and isinstance(payload, str) and runs.has(payload):
            part.set_payload(runs.inflate(payload))


def _parse(
    raw: bytes, base: dict[str, object], max_body: int
) -> tuple[MessageRecord, list[bytes]]:
    msg = _message(raw)
    state = _State(max_body=max_body)
    return _record(msg, base, state, body=True)


def _message(raw: bytes) -> Message:
    """``_PARSER.parsebytes(raw)``, the same tree, for less CPU on a large message
    (issue 18): the stdlib parser goes through a body line by line in Python, so a
    message of at least :data:`_ELIDE_FROM` octets is parsed from its skeleton (runs of
    at least :data:`_ELIDE_RUN` octets of leaf-body lines elided, see :mod:`.spool`;
    none past :data:`_ELIDE_HEADERS` octets of header blocks) and every elided run is
    then put back where the parser would have put it."""
    if len(raw) < _ELIDE_FROM:
        simple = _simple(raw)
        return simple if simple is not None else _PARSER.parsebytes(raw)
    try:
        f = io.BytesIO(raw)
        sk = skeleton(f, _ELIDE_RUN, _ELIDE_HEADERS)
        if not sk.runs:
            # Nothing elided: the skeleton is a copy of ``raw``; parse ``raw`` and
            # keep no second copy of the message while the parser runs.
            del sk
            return _PARSER.parsebytes(raw)
        msg = _PARSER.parsebytes(sk.data)
        _inflate_outside_leaves(msg, Runs(sk, f, None), leaves=True)
        return msg
    except Exception as exc:  # the scan never should fail; if it does, parse it all
        log.warning("parse_skeleton_failed", size=len(raw), error=repr(exc))
        return _PARSER.parsebytes(raw)


# email.feedparser.headerRE's field line, with a name of at least one character (an
# empty one, a "From " line and a continuation line come with defects or an envelope).
_FIELD_LINE: Final = re.compile(r"[\041-\071\073-\176]+:")


def _simple(raw: bytes) -> Message | None:
    """``_PARSER.parsebytes(raw)`` for a message of one part, the same tree, without
    the feedparser's walk through the body line by line (issue 18: about a third of
    a small message's parse); None when ``raw`` is not of that kind.

    Of that kind: a header block of field lines (a name of the characters the
    feedparser takes, a colon) and continuation lines, none first, every line ending
    in CRLF (no other CR or LF in it), then an empty line, and a Content-Type that is
    neither multipart/* nor message/*. The feedparser then gives each field
    ``compat32.header_source_parse`` of its lines, no defect, and the rest of the
    text after the empty line as the payload, which is what this builds.
    """
    end = raw.find(b"\r\n\r\n")
    if end <= 0:
        return None
    text = raw.decode("ascii", "surrogateescape")  # as BytesParser decodes
    lines = text[:end].split("\r\n")
    if text.count("\r", 0, end) >= len(lines) or text.count("\n", 0, end) >= len(lines):
        return None  # a CR or LF outside the CRLFs: the feedparser splits there
    fields: list[list[str]] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not fields:
                return None  # FirstHeaderLineIsContinuationDefect
            fields[-1].append(line + "\r\n")
        elif _FIELD_LINE.match(line) is not None:
            fields.append([line + "\r\n"])
        else:
            return None  # "From ", no name, empty or no field: ends the header block
    msg = Message(policy=email_policy.compat32)
    source_parse = email_policy.compat32.header_source_parse
    for field_lines in fields:
        msg.set_raw(*source_parse(field_lines))
    if msg.get_content_maintype() in ("multipart", "message"):
        return None
    msg.set_payload(text[end + 4 :])
    return msg


def _record(
    msg: Message, base: dict[str, object], state: _State, *, body: bool
) -> tuple[MessageRecord, list[bytes]]:
    """The record of ``msg`` (of the original it carries when ``msg`` is a server's
    notice, see :mod:`.wrapper`); ``body=False`` for a header block alone."""
    notice = msg
    wrapped = find_wrapped(msg) if body else None
    if wrapped is not None:
        state.defect(wrapped.part, SERVER_WRAPPED, wrapped.detail())
        msg = wrapped.inner
    elif (shape := header_block_shape(msg)) is not None:
        state.defect("", SERVER_WRAPPED, headers_only_detail(shape))
    headers: list[tuple[str, str]] = []
    by_name: dict[str, list[str]] = {}
    raw_by_name: dict[str, list[str]] = {}
    hint, state.hint_part = _charset_hint(msg)
    state.hint = hint
    for name, value in msg.raw_items():
        name = str(name)
        if not isinstance(value, str):
            value = str(value)
        text, problems = decode_header(value, hint)
        for problem in problems:
            state.defect("", "HeaderDecodeDefect", f"{name}: {problem}")
        headers.append((name, text))
        lower = name.lower()
        by_name.setdefault(lower, []).append(text)
        raw_by_name.setdefault(lower, []).append(value)

    fields: dict[str, object] = dict(base)
    fields["headers"] = headers
    for attr, header in _ADDRESS_FIELDS:
        values = raw_by_name.get(header)
        if not values:
            continue
        addresses, problems = parse_addresses(values, hint)
        for problem in problems:
            if not problem.startswith("8-bit header"):  # reported with the header
                state.defect("", "AddressDefect", f"{header}: {problem}")
        if not addresses and any(v.strip() for v in values) and ":" not in values[0]:
            state.defect("", "AddressDefect", f"{header}: no address found")
        fields[attr] = addresses

    message_id = _first_id(by_name.get("message-id"))
    fields["message_id"] = message_id
    date_raw = _first(by_name, "date")
    fields["date_raw"] = date_raw
    fields["date"] = _date(date_raw, state)
    subject = _first(by_name, "subject")
    fields["subject"] = subject
    in_reply_to = _ids(by_name.get("in-reply-to"))
    references = _ids(by_name.get("references"))
    fields["in_reply_to"] = in_reply_to
    fields["references"] = references
    fields["thread_key"] = _thread_key(
        references, in_reply_to, message_id, subject, str(base.get("sha256", ""))
    )
    list_id = _first(by_name, "list-id")
    if list_id is not None:
        m = _ANGLE_ID.search(list_id)
        list_id = (m.group(1) if m else list_id).strip() or None
    fields["list_id"] = list_id
    from_list = fields.get("from_addresses") or []
    assert isinstance(from_list, list)
    content_type = _content_type(msg)
    reason = autoreply.detect(
        by_name, content_type, [a.address for a in from_list if isinstance(a, Address)]
    )
    fields["auto_reply"] = reason is not None
    fields["auto_reply_reason"] = reason

    if body:
        for defect in notice.defects if wrapped is not None else ():
            state.defect("", type(defect).__name__, str(defect).strip() or _doc(defect))
        _walk(msg, state, wrapped.part if wrapped is not None else "")
        body_text, html, from_html = state.body.result()
        fields["text"], fields["html"] = body_text, html
        fields["text_from_html"] = from_html
    else:
        for defect in msg.defects:
            state.defect("", type(defect).__name__, str(defect).strip() or _doc(defect))
    fields["attachments"] = state.attachments
    fields["defects"] = state.defects
    return MessageRecord.model_validate(_clean_record(fields)), state.payloads  # type: ignore[return-value]


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean_record(fields: dict[str, Any]) -> dict[str, Any]:
    """:func:`_clean` of a whole record, ``fields`` itself when it has no lone
    surrogate: one search over all its strings (joining strings never pairs two
    surrogates: a Python str holds code points) instead of a copy of every container
    (issue 18: a quarter of the time of ``_record`` on small messages)."""
    texts: list[str] = []
    _texts(fields, texts)
    if not _has_surrogate("".join(texts)):
        return fields
    cleaned: dict[str, Any] = _clean(fields)
    return cleaned


def _texts(value: Any, out: list[str]) -> None:
    """Append to ``out`` every string value inside ``value``, where :func:`_clean`
    looks: dict values, list and tuple items, pydantic model fields."""
    if isinstance(value, str):
        out.append(value)
        return
    if isinstance(value, dict):
        items: Iterable[Any] = value.values()
    elif isinstance(value, list | tuple):
        items = value
    elif isinstance(value, BaseModel):
        items = [getattr(value, name) for name in type(value).model_fields]
    else:
        return
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _CONTAINERS):
            _texts(item, out)


_CONTAINERS: Final = (dict, list, tuple, BaseModel)


def _has_surrogate(text: str) -> bool:
    """True when ``text`` holds a surrogate code point: the one thing a strict UTF-8
    encode refuses (a C loop; the regex search was slower on long bodies, issue 18)."""
    if text.isascii():  # a flag of the string: no scan
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _clean(value: Any) -> Any:
    """Replace lone surrogates (undecoded octets, UTF-7 oddities) so records are valid
    Unicode and serialise as JSON; returns ``value`` itself when nothing changes."""
    if isinstance(value, str):
        if not _has_surrogate(value):
            return value
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            return _LONE_SURROGATE.sub("\ufffd", value)
    # An ASCII str (a flag, no scan) is clean: skipped without a call (issue 18).
    if isinstance(value, dict):
        out = {
            k: v if type(v) is str and v.isascii() else _clean(v)
            for k, v in value.items()
        }
        return value if all(map(operator.is_, out.values(), value.values())) else out
    if isinstance(value, list | tuple):
        items = [v if type(v) is str and v.isascii() else _clean(v) for v in value]
        if all(map(operator.is_, items, value)):
            return value
        return type(value)(items) if isinstance(value, tuple) else items
    if isinstance(value, BaseModel):
        data = {k: getattr(value, k) for k in type(value).model_fields}
        cleaned = _clean(data)
        return value if cleaned is data else type(value).model_validate(cleaned)
    return value


def _first(by_name: dict[str, list[str]], name: str) -> str | None:
    values = by_name.get(name)
    return values[0] if values else None


def _payload(part: Message) -> Any:
    """The parsed payload as stored (a list of parts, or the undecoded body text)."""
    return getattr(part, "_payload", None)


def _charset_hint(msg: Message) -> tuple[str | None, Message | None]:
    """The charset of the top-level or first body part: what 8-bit headers likely use;
    with the part it is the charset of (its body needs not look it up again)."""
    part = msg
    for _ in range(4):
        charset = _charset(part)
        if charset is not None:
            return charset, part
        payload = _payload(part)
        if not isinstance(payload, list) or not payload:
            return None, None
        part = payload[0]
        if not isinstance(part, Message):
            return None, None
    return None, None


def _doc(obj: object) -> str:
    return (type(obj).__doc__ or "").strip().split("\n", 1)[0]


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "text/plain"


def _first_id(values: list[str] | None) -> str | None:
    if not values:
        return None
    m = _ANGLE_ID.search(values[0])
    value = (m.group(1) if m else values[0]).strip()
    return "".join(value.split()) or None


def _ids(values: list[str] | None) -> list[str]:
    if not values:
        return []
    out: list[str] = []
    for value in values:
        found = _ANGLE_ID.findall(value)
        if not found:  # RFC 5322 §4.5.4 obsolete forms: bare ids separated by space
            found = [v for v in re.split(r"[\s,]+", value) if "@" in v]
        for item in found:
            item = "".join(item.split())
            if item and item not in out:
                out.append(item)
    return out


def _thread_key(
    references: list[str],
    in_reply_to: list[str],
    message_id: str | None,
    subject: str | None,
    fallback: str,
) -> str:
    # RFC 5322 §3.6.4: the first References id is the thread's root
    if references:
        seed = "id:" + references[0]
    elif in_reply_to:
        seed = "id:" + in_reply_to[0]
    elif message_id:
        seed = "id:" + message_id
    elif subject and subject.strip():
        normal = _SUBJECT_PREFIX.sub("", subject)
        seed = "subject:" + " ".join(normal.casefold().split())
    else:
        seed = "raw:" + fallback
    return hashlib.sha256(seed.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _date(value: str | None, state: _State) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except Exception:
        state.defect("", "DateDefect", f"unparseable Date: {value[:100]!r}")
        return None
    if parsed.tzinfo is None:  # RFC 5322 §3.3: "-0000" means UTC, zone unknown
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        state.defect("", "DateDefect", f"Date out of range: {value[:100]!r}")
        return None


def _walk(root: Message, state: _State, base: str = "") -> None:
    """Visit every part depth-first, iteratively, with IMAP-style part paths.

    ``base`` is the path of the message/* part that ``root`` is the message of ("" for
    the top level): its parts are ``base.1``, ``base.2``, ... (a non-multipart root's
    body is ``base.1``, "1" at the top level), as IMAP numbers them.
    """
    stack: list[tuple[Message, str, int, str]] = [(root, base, 0, "")]
    body_path = f"{base}.1" if base else "1"
    while stack:
        part, path, depth, parent = stack.pop()
        if not state.take(path):
            return
        for defect in part.defects:
            state.defect(
                path, type(defect).__name__, str(defect).strip() or _doc(defect)
            )
        ctype = _content_type(part)
        payload = _payload(part)
        if isinstance(payload, list):
            if not ctype.startswith("multipart/"):  # message/rfc822, delivery-status...
                _nested(part, body_path if part is root else path, ctype, state)
                continue
            if depth >= _MAX_DEPTH:
                state.defect(
                    path, "TooDeep", f"nesting deeper than {_MAX_DEPTH}; kept raw"
                )
                continue
            children = [c for c in payload if isinstance(c, Message)]
            for i in range(len(children) - 1, -1, -1):
                child_path = f"{path}.{i + 1}" if path else str(i + 1)
                stack.append((children[i], child_path, depth + 1, ctype))
            continue
        _leaf(part, body_path if part is root else path, ctype, parent, state)


def _nested(part: Message, path: str, ctype: str, state: _State) -> None:
    """Record a message/* part (rfc822, delivery-status, ...) as one attachment."""
    try:
        inner = part.get_payload()
        blocks = inner if isinstance(inner, list) else [inner]
        data = b"\n".join(_as_bytes(b) for b in blocks if isinstance(b, Message))
        if ctype == "message/delivery-status":
            data = b"".join(_as_bytes(b) for b in blocks if isinstance(b, Message))
    except Exception as exc:
        state.defect(path, "NestedMessageDefect", f"{type(exc).__name__}: {exc}")
        data = b""
    for i, block in enumerate(blocks if isinstance(blocks, list) else []):
        if isinstance(block, Message):
            sub = f"{path}.{i + 1}" if len(blocks) > 1 else path
            for defect in block.defects:
                state.defect(
                    sub, type(defect).__name__, str(defect).strip() or _doc(defect)
                )
    filename, problems = filename_of(part, state.hint)
    for problem in problems:
        state.defect(path, "FilenameDefect", problem)
    rfc822 = ctype in ("message/rfc822", "message/global")
    if filename is None and rfc822 and blocks and isinstance(blocks[0], Message):
        subject = blocks[0].get("subject")
        if subject:
            filename = decode_header(str(subject))[0][:120] + ".eml"
    state.attach(
        data,
        part=path,
        filename=filename,
        content_type=ctype,
        disposition=_disposition(part),
        content_id=_content_id(part),
        source="rfc822" if rfc822 else "mime",
    )


def _as_bytes(msg: Message) -> bytes:
    """Serialise a parsed part from its stored raw strings (no re-folding, no re-encoding).

    The stdlib parser keeps header values and bodies as the received text (8-bit
    octets as surrogate escapes), so this reproduces the original bytes up to line
    endings at part boundaries; iterative, so deep nesting cannot exhaust the stack.
    """
    out: list[str] = []
    stack: list[Message | str] = [msg]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        for name, value in item.raw_items():
            out.append(f"{name}: {value}\n")
        out.append("\n")
        payload = _payload(item)
        if not isinstance(payload, list):
            out.append(str(payload or ""))
            continue
        children = [c for c in payload if isinstance(c, Message)]
        boundary = (
            item.get_boundary() if item.get_content_maintype() == "multipart" else None
        )
        todo: list[Message | str] = []
        if boundary is None:
            todo.extend(children)
        else:
            if item.preamble:
                todo.append(item.preamble + "\n")
            for child in children:
                todo.extend([f"--{boundary}\n", child, "\n"])
            todo.append(f"--{boundary}--\n")
            if item.epilogue:
                todo.append(item.epilogue)
        stack.extend(reversed(todo))
    return "".join(out).encode("utf-8", "surrogateescape")


def _disposition(part: Message) -> str | None:
    try:
        return part.get_content_disposition()
    except Exception:
        return None


def _content_id(part: Message) -> str | None:
    value = part.get("content-id")
    if value is None:
        return None
    text = decode_header(str(value))[0]
    m = _ANGLE_ID.search(text)
    return (m.group(1) if m else text).strip() or None


def _leaf(part: Message, path: str, ctype: str, parent: str, state: _State) -> None:
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    raw = _payload(part)
    data: bytes | SpooledPayload | None = None
    if state.runs is not None and isinstance(raw, str) and state.runs.has(raw):
        data = _spooled(part, path, ctype, cte, raw, state)
        if data is None:
            raw = state.runs.inflate(raw)
            part.set_payload(raw)
    if data is None:
        data = _decoded(part, path, cte, raw, state)
    disposition = _disposition(part)
    filename, problems = filename_of(part, state.hint)
    for problem in problems:
        state.defect(path, "FilenameDefect", problem)
    maintype = ctype.split("/", 1)[0]

    is_body = (
        maintype == "text"
        and ctype in ("text/plain", "text/html")
        and disposition != "attachment"
        and filename is None
        and cte not in _UU_TYPES
    ) or ctype.startswith("multipart/")  # a multipart whose boundary was missing
    if is_body:
        kind = "html" if ctype == "text/html" else "text"
        octets = _body_octets(data, kind, path, state)
        charset = state.hint if part is state.hint_part else _charset(part)
        if ctype == "text/html" and charset is None:
            charset = html_charset(octets)
        text, charset_problem = decode_text(octets, charset)
        if charset_problem is not None:
            state.defect(path, "CharsetDefect", charset_problem)
        if "\r" in text:  # bodies use "\n"; the raw bytes keep CRLF
            text = text.replace("\r\n", "\n")
        if ctype == "text/html":
            state.body.add_html(text)
        else:
            rest, files, uu_problems = extract_uuencoded(text, limit=state.room())
            for problem in uu_problems:
                state.defect(path, "UuencodeDefect", problem)
            for f in files:
                state.take(path)
                state.attach(
                    f.data,
                    part=path,
                    filename=f.filename,
                    content_type=f.content_type,
                    disposition="attachment",
                    source="uuencode",
                )
            if not state.room() and has_uuencoded(rest):
                state.take(path)  # blocks left in the text: over the cap
            state.body.add_text(rest)
        return

    content_id = _content_id(part)
    inline = disposition == "inline" or (disposition is None and content_id is not None)
    source: AttachmentSource = "uuencode" if cte in _UU_TYPES else "mime"
    if ctype in ("message/rfc822", "message/global"):  # encoded, so not parsed
        source = "rfc822"
    state.attach(
        data,
        part=path,
        filename=filename,
        content_type=ctype,
        disposition=disposition,
        content_id=content_id,
        inline=inline,
        source=source,
    )
    if ctype in TNEF_TYPES or (filename or "").lower() == "winmail.dat":
        assert isinstance(data, bytes)  # _spooled leaves TNEF to memory
        _tnef(data, path, state)


def _decoded(part: Message, path: str, cte: str, raw: object, state: _State) -> bytes:
    """The leaf's decoded octets, in memory (its raw octets when undecodable)."""
    raw_bytes = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""
    data: bytes | None
    if cte == "base64":
        data, problem = _b64decode(raw_bytes)
        if problem is not None:
            state.defect(path, "Base64Defect", problem)
    else:
        known = len(part.defects)
        try:
            decoded = part.get_payload(decode=True)
            data = decoded if isinstance(decoded, bytes) else None
        except Exception as exc:
            state.defect(path, "PayloadDecodeDefect", f"{type(exc).__name__}: {exc}")
            data = None
        for defect in part.defects[known:]:  # added while decoding
            state.defect(
                path, type(defect).__name__, str(defect).strip() or _doc(defect)
            )
    return data if isinstance(data, bytes) else raw_bytes


def _spooled(
    part: Message, path: str, ctype: str, cte: str, raw: str, state: _State
) -> SpooledPayload | None:
    """The leaf's decoded octets streamed from the file (see parse_file) into a
    spool file, as :func:`_decoded` would give them; None when they must be decoded
    in memory (TNEF, uuencode, a multipart without boundary, base64 that cannot
    stream)."""
    assert state.runs is not None
    filename, _ = filename_of(part, state.hint)
    tnef = ctype in TNEF_TYPES or (filename or "").lower() == "winmail.dat"
    # get_payload(decode=True) lowers the value but does not strip it
    stdlib_cte = str(part.get("content-transfer-encoding", "")).lower()
    if tnef or ctype.startswith("multipart/") or part.is_multipart():
        return None
    if cte in _UU_TYPES or stdlib_cte in _UU_TYPES:
        return None
    decoder: type[SpoolWriter]
    if cte == "base64":
        decoder = RunDecoder
    elif stdlib_cte == "quoted-printable":
        decoder = QpDecoder
    else:
        decoder = CopyDecoder
    decoded = state.runs.decode(raw, decoder)
    if decoded is None:
        return None
    data, problem = decoded
    if problem is not None:
        state.defect(path, "Base64Defect", problem)
    return data


#: A uuencode "begin" line (RFC-less, as uudecode reads it): mode and a name.
_UU_BEGIN = re.compile(rb"(?m)^begin [0-7]{3,4} \S")


def _uu_begin_in(data: SpooledPayload, start: int) -> bool:
    """True when a uuencode begin line occurs in ``data`` from offset ``start``, read
    in pieces (a line cut between two pieces is seen whole: 64 octets overlap)."""
    tail = b""
    for chunk in data.chunks():
        if start:
            if len(chunk) <= start:
                start -= len(chunk)
                continue
            chunk, start = chunk[start:], 0
        if _UU_BEGIN.search(tail + chunk):
            return True
        tail = chunk[-64:]
    return False


def _body_octets(
    data: bytes | SpooledPayload, kind: str, path: str, state: _State
) -> bytes:
    """The octets of a body part that go into the record's ``text`` or ``html``:
    all of them while the message's parts of that kind stay within ``max_body``
    octets, else a prefix (see :func:`.body.cut_body`) and a BodyTruncated defect."""
    left = state.body_left.get(kind, state.max_body)
    size = len(data)
    beyond = False
    if isinstance(data, bytes):
        head = data[: left + 1]
        beyond = size > left and _UU_BEGIN.search(data, max(0, left - 16)) is not None
    else:
        head = data.head(left + 1)
        if size > left:
            beyond = _uu_begin_in(data, max(0, left - 16))
        data.file.close()  # a body part is no attachment: its spool file goes
    if size <= left:
        state.body_left[kind] = left - size
        return head
    if beyond and kind == "text":
        # Review of issue 20.6: a uuencoded attachment past the cap is not extracted;
        # never silently: say so, and how to get it.
        state.defect(
            path,
            "UuencodeBeyondCap",
            f"a uuencoded block begins past the first {left} octets of this text "
            "body: not extracted (raise max_body_size to extract it; the raw message "
            "holds it)",
        )
    head = head[:left]
    kept = cut_body(head)
    state.body_left[kind] = 0
    state.defect(
        path,
        BODY_TRUNCATED,
        f"{kind} body part of {size} octets: the first {len(kept)} kept in the "
        f"record ({state.max_body} octets of {kind} body parts per message); the "
        "raw message holds them all",
    )
    return kept


def _b64decode(data: bytes) -> tuple[bytes, str | None]:
    """Decode base64 leniently (RFC 2045 §6.8: ignore characters outside the alphabet).

    A final quantum of one character (4n+1) is dropped and missing padding added, as
    mail readers do; the problem is reported.
    """
    try:
        return binascii.a2b_base64(data), None
    except binascii.Error:
        pass
    clean = _NOT_B64.sub(b"", data)
    extra = len(clean) % 4
    problem = f"base64 length {len(clean)} is not a multiple of 4"
    if extra == 1:
        clean = clean[:-1]
    elif extra:
        clean += b"=" * (4 - extra)
    try:
        return binascii.a2b_base64(clean), problem
    except binascii.Error as exc:  # pragma: no cover - clean input always decodes
        return data, f"base64 undecodable ({exc}); raw bytes kept"


def _tnef(data: bytes, path: str, state: _State) -> None:
    files, body, html, problems = expand_tnef(data)
    for problem in problems:
        state.defect(path, "TnefDefect", problem)
    for f in files:
        if not state.take(path):
            break
        _attach_extracted(f, path, state)
    if body:
        state.body.add_fallback_text(body)
    if html:
        state.body.add_fallback_html(html)


def _attach_extracted(f: Extracted, path: str, state: _State) -> None:
    state.attach(
        f.data,
        part=path,
        filename=f.filename,
        content_type=f.content_type,
        disposition="attachment",
        source="tnef",
    )


def _charset(part: Message) -> str | None:
    try:
        value = param(part, "charset")
    except Exception:
        return None
    if isinstance(value, tuple):
        value = value[2]
    if not value:
        return None
    return str(value).strip() or None
