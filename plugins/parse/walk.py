"""The walk of a parsed message's MIME tree and the decoding of its leaves.

``_walk`` visits every part of an ``email.message`` tree depth-first, iteratively, with
IMAP-style part paths, and fills a ``_State``: a leaf that is body text goes into the
record's ``text`` or ``html`` (at most ``max_body`` octets of each kind,
:data:`MAX_BODY` by default), any other leaf or message/* part becomes an attachment
with its decoded bytes (base64 decoded leniently; uuencoded blocks and TNEF files
extracted as attachments of their own), and what cannot be decoded becomes a defect.
No message yields more than :data:`MAX_PARTS` parts. Under ``parse_file`` a long leaf
is decoded from the file into a spool file (see :mod:`.spool`). The entry points and
the record builder, which call the walk, are in :mod:`.parser`.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Final

from .attachments import (
    TNEF_TYPES,
    Extracted,
    expand_tnef,
    extract_uuencoded,
    filename_of,
    has_uuencoded,
)
from .base64_decode import a2b_base64
from .body import BodyParts, cut_body, html_charset
from .charsets import decode_text
from .headers import decode_header, param
from .record import (
    BODY_TRUNCATED,
    Attachment,
    AttachmentSource,
    Defect,
)
from .spool import RunDecoder, Runs, SpooledPayload, SpoolWriter
from .transfer import CopyDecoder, QpDecoder

_ANGLE_ID = re.compile(r"<([^<>]*)>")
_NOT_B64 = re.compile(rb"[^A-Za-z0-9+/]")
_MAX_DEPTH = 40
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


def _payload(part: Message) -> Any:
    """The parsed payload as stored (a list of parts, or the undecoded body text)."""
    return getattr(part, "_payload", None)


def _doc(obj: object) -> str:
    return (type(obj).__doc__ or "").strip().split("\n", 1)[0]


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "text/plain"


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
        return a2b_base64(data), None  # binascii's result, vectorised (issue 18)
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
