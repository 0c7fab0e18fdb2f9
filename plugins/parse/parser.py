"""parse_message: raw RFC 5322 bytes to a MessageRecord plus attachment bytes, never raising.

This module holds the entry points (:func:`parse_message`, :func:`parse_file`: bytes
or a file to an ``email.message`` tree, a large message by way of its skeleton) and
the record builder (``_record``: the MessageRecord of a tree, its header fields built
here, its body and attachments by the walk). The walk of the MIME tree and the
decoding of its leaves, with the per-parse state and its caps (:data:`MAX_PARTS`,
:data:`MAX_BODY`), are in :mod:`.walk`; the replacement of lone surrogates in a
finished record is in :mod:`.cleaning`. The names once defined here that others
import from here (``MAX_PARTS``, ``MAX_BODY``; ``_clean_record``, ``_clean`` and
``_has_surrogate`` in tests) still import from here.
"""

from __future__ import annotations

import hashlib
import io
import re
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import Message
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Final

import structlog

from . import autoreply, walk
from .addresses import parse_addresses
from .cleaning import _clean as _clean
from .cleaning import _clean_record
from .cleaning import _has_surrogate as _has_surrogate
from .headers import decode_header
from .record import SERVER_WRAPPED, Address, Defect, MessageRecord
from .spool import Runs, SpooledPayload, skeleton
from .walk import MAX_BODY as MAX_BODY
from .walk import MAX_PARTS as MAX_PARTS
from .walk import (
    _charset,
    _content_type,
    _doc,
    _payload,
    _State,
    _walk,
)
from .wrapper import find_wrapped, header_block_shape, headers_only_detail

log = structlog.get_logger()

# walk's pattern, bound by assignment: CPython 3.11 compiles a method call on a name
# an import statement bound as an attribute load (a bound method built each call), not
# LOAD_METHOD; _record, _first_id and _ids call it on every message (issue 18).
_ANGLE_ID = walk._ANGLE_ID
_PARSER = BytesParser(policy=email_policy.compat32)
_HEADERS_PARSER = BytesParser(policy=email_policy.compat32)
_SUBJECT_PREFIX = re.compile(
    r"^(?:\s*(?:re|fwd?|aw|wg|sv|vs|antw|rif|r|tr|odp|ynt|res|enc)\s*(?:\[\d+\])?\s*[:\uff1a]"
    r"|\s*\[[^\]]*\])+",
    re.I,
)
#: parse_message parses messages of at least this many octets from their skeleton,
#: eliding runs of at least _ELIDE_RUN octets (see _message).
_ELIDE_FROM: Final = 64 * 1024
_ELIDE_RUN: Final = 16 * 1024
#: ... and stops eliding past this many octets of header blocks (a message of many
#: nested messages, or of huge headers, would have them parsed twice for nothing).
_ELIDE_HEADERS: Final = 64 * 1024
_ADDRESS_FIELDS = (
    ("from_addresses", "from"),
    ("sender", "sender"),
    ("reply_to", "reply-to"),
    ("to", "to"),
    ("cc", "cc"),
    ("bcc", "bcc"),
)


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


def _first(by_name: dict[str, list[str]], name: str) -> str | None:
    values = by_name.get(name)
    return values[0] if values else None


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
