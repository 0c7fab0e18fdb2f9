"""Attachment helpers: file names, uuencoded blocks in text, TNEF (winmail.dat) expansion."""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from email.message import Message
from email.utils import collapse_rfc2231_value

from .headers import decode_words, param, raw_to_text, unfold

# POSIX uuencode: "begin <mode> <name>", encoded lines, "`" or " " line, "end".
_UU_BEGIN = re.compile(r"^begin(?:-base64)? +([0-7]{3,4}) +(\S[^\r\n]*?)\s*$", re.M)
_UU_END = re.compile(r"^end\s*$", re.M)
_SURROGATE = re.compile("[\udc80-\udcff]")
_RFC2231_CHARSET = re.compile(r"^([A-Za-z0-9_.:-]+)'[^']*'")

TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})


@dataclass(slots=True)
class Extracted:
    """A file found inside a part: decoded name, type guess and bytes."""

    filename: str | None
    content_type: str
    data: bytes


def _surrogate_free(part: Message, hint: str | None) -> Message:
    """Return ``part``, or a stand-in whose parameter headers have 8-bit bytes decoded.

    The stdlib turns raw 8-bit header bytes into U+FFFD when reading parameters.
    """
    raw = {
        name.lower(): value
        for name, value in part.raw_items()
        if name.lower() in ("content-type", "content-disposition")
    }
    if not any(isinstance(v, str) and _SURROGATE.search(v) for v in raw.values()):
        return part
    stand_in = Message()
    for name, value in raw.items():
        stand_in[name] = raw_to_text(unfold(str(value)), hint)[0]
    return stand_in


def filename_of(part: Message, hint: str | None = None) -> tuple[str | None, list[str]]:
    """Return the decoded file name of a part and any problems; never raises.

    Looks at Content-Disposition ``filename`` then Content-Type ``name``; RFC 2231
    (charset'language'%XX and continuations) is decoded by the stdlib, RFC 2047
    encoded-words (not allowed in parameters, common anyway) and raw 8-bit bytes
    (``hint``: the body charset) here.
    """
    problems: list[str] = []
    raw: object = None
    try:
        part = _surrogate_free(part, hint)
        raw = param(part, "filename", "content-disposition")
        if raw is None:
            raw = param(part, "name", "content-type")
    except Exception as exc:
        problems.append(f"file name parameter unparseable: {type(exc).__name__}")
        return None, problems
    if raw is None:
        return None, problems
    try:
        if isinstance(raw, tuple):
            charset, _lang, text = raw
            name = collapse_rfc2231_value((charset or "us-ascii", _lang, text))
            if "\ufffd" in name or (charset and name == text and "%" in text):
                problems.append(f"file name in charset {charset!r} partly undecodable")
        else:
            name = str(raw)
            m = _RFC2231_CHARSET.match(name)
            if m and "%" in name:  # an RFC 2231 value whose "*" was lost
                from urllib.parse import unquote_to_bytes

                from .charsets import decode_text

                name, _ = decode_text(unquote_to_bytes(name[m.end() :]), m.group(1))
    except Exception as exc:
        problems.append(f"file name undecodable: {type(exc).__name__}")
        name = str(raw)
    name, problem = raw_to_text(unfold(name))
    if problem is not None:
        problems.append(f"file name: {problem}")
    if "=?" in name:
        name, word_problems = decode_words(name)
        problems.extend(word_problems)
    name = name.strip().replace("\r", "").replace("\n", "")
    return (name or None), problems


def has_uuencoded(text: str) -> bool:
    """True when ``text`` still holds the ``begin`` line of a uuencoded block."""
    return "begin" in text and _UU_BEGIN.search(text) is not None


def extract_uuencoded(
    text: str, *, limit: int | None = None
) -> tuple[str, list[Extracted], list[str]]:
    """Cut uuencoded blocks out of a text body; returns (rest, files, problems).

    At most ``limit`` blocks are cut (the part cap: every block is a part); any
    further ones stay in the text, untouched. A block that does not decode cleanly
    is reported. Linear in the length of ``text``.
    """
    if "begin " not in text or limit == 0:
        return text, [], []
    files: list[Extracted] = []
    problems: list[str] = []
    out: list[str] = []
    pos = 0
    for begin in _UU_BEGIN.finditer(text):
        if begin.start() < pos:
            continue
        if limit is not None and len(files) >= limit:
            break
        end = _UU_END.search(text, begin.end())
        if end is None:
            problems.append(f"uuencoded {begin.group(2)!r} has no 'end' line")
            break
        body = text[begin.end() : end.start()]
        data = bytearray()
        bad = 0
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                data += binascii.a2b_uu(line.encode("latin-1", "replace"))
            except binascii.Error:
                # RFC-less uuencode: some encoders emit extra padding; trust the count
                try:
                    n = (ord(line[0]) - 32) & 63
                    data += binascii.a2b_uu(line[: ((n + 2) // 3) * 4 + 1].encode())
                except (binascii.Error, IndexError, UnicodeEncodeError):
                    bad += 1
        if bad:
            problems.append(f"uuencoded {begin.group(2)!r}: {bad} undecodable line(s)")
        out.append(text[pos : begin.start()])
        pos = end.end()
        files.append(
            Extracted(begin.group(2), _guess_type(begin.group(2)), bytes(data))
        )
    out.append(text[pos:])
    return "".join(out), files, problems


def _guess_type(filename: str | None) -> str:
    import mimetypes

    guessed = mimetypes.guess_type(filename or "", strict=False)[0]
    return guessed or "application/octet-stream"


def expand_tnef(
    data: bytes,
) -> tuple[list[Extracted], str | None, str | None, list[str]]:
    """Expand a TNEF stream: (files, plain body, html body, problems); never raises."""
    try:
        from tnefparse import TNEF
    except ImportError:  # pragma: no cover - tnefparse is a dependency
        return [], None, None, ["tnefparse is not installed; winmail.dat kept as is"]
    try:
        tnef = TNEF(data, do_checksum=False)
    except Exception as exc:
        return [], None, None, [f"TNEF undecodable: {type(exc).__name__}: {exc}"]
    files: list[Extracted] = []
    problems: list[str] = []
    for att in getattr(tnef, "attachments", []):
        try:
            name = att.long_filename() or att.name or None
        except Exception:
            name = None
        payload = att.data if isinstance(att.data, bytes) else b""
        files.append(Extracted(name, _guess_type(name), payload))
    body = _tnef_text(getattr(tnef, "body", None))
    html = _tnef_text(getattr(tnef, "htmlbody", None))
    if body is None and html is None:
        try:
            rtf = tnef.rtfbody
        except Exception:
            rtf = None
        if rtf:
            files.append(Extracted("body.rtf", "application/rtf", bytes(rtf)))
    return files, body, html, problems


def _tnef_text(value: object) -> str | None:
    if isinstance(value, bytes):
        from .charsets import decode_text

        return decode_text(value.rstrip(b"\0"), None)[0] or None
    if isinstance(value, str):
        return value.rstrip("\0") or None
    return None
