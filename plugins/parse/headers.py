"""Header text: unfolding, raw 8-bit bytes and RFC 2047 encoded-words, never raising."""

from __future__ import annotations

import binascii
import re
from email.message import Message
from typing import Any

from .charsets import codec_for, decode_header_bytes, decode_text

# RFC 5322 §2.2.3: unfolding removes each CRLF that is followed by WSP; the folding
# white space is shown as one space, as mail readers do.
_FOLD = re.compile(r"(?:[ \t]*\r?\n[ \t]+)+")
_EOL = re.compile(r"[\r\n]+")
# RFC 2047 §2: =?charset?encoding?encoded-text?= (RFC 2231 §5 allows charset*lang).
# Matched leniently (spaces seen in the wild) but never across lines.
_WORD = re.compile(r"=\?([^?\s]+)\?[ \t]?([QqBb])\?([^?\r\n]*?)\?=")
_QHEX = re.compile(rb"=([0-9A-Fa-f]{2})")
_SURROGATES = re.compile("[\udc80-\udcff]")
# A Content-Type of one parameter whose value get_param() returns unchanged: a type
# and a parameter name without "*" (no RFC 2231), a token value (no quote, backslash
# or angle bracket for its unquoting to change), quoted or not; ASCII only, so that
# case-insensitive matching folds no other letter (get_param compares str.lower()).
_TOKEN = r"[A-Za-z0-9!#$%&'+.^_`{|}~-]"
_ONE_PARAM = re.compile(
    rf"[ \t\r\n]*{_TOKEN}+/{_TOKEN}+[ \t\r\n]*;[ \t\r\n]*({_TOKEN}+)[ \t\r\n]*="
    rf'[ \t\r\n]*(?:"({_TOKEN}+)"|({_TOKEN}+))[ \t\r\n]*\Z',
    re.ASCII,
)


def param(part: Message, name: str, header: str = "content-type") -> Any:
    """``part.get_param(name, None, header)`` (may raise as it does), without parsing
    the header when ``name`` is nowhere in its text: a parameter (or RFC 2231
    continuation) is found only under its own name, compared in lower case, so
    then the answer is None anyway (issue 18: each parse of a header's parameters
    costs tens of microseconds; most parts have no file name)."""
    value = part.get(header)
    if value is None or name.lower() not in str(value).lower():
        return None
    if header == "content-type":
        # The usual shape, ``type/subtype; name=value`` (the value a token, quoted
        # or not): the stdlib's answer is the value as written (issue 18: ~10 us).
        m = _ONE_PARAM.match(str(value))
        if m is not None and m.group(1).lower() == name.lower():
            return m.group(2) if m.group(2) is not None else m.group(3)
    return part.get_param(name, None, header)


def unfold(value: str) -> str:
    """Unfold a header value (RFC 5322 §2.2.3); stray CR/LF become spaces.

    The result is ``_EOL.sub(" ", _FOLD.sub(" ", value))``: each run of folds (white
    space, CR LF or LF, white space, repeated) becomes one space, then each run of
    the CR and LF left becomes one space. It is computed line by line (a fold is an
    LF whose next line starts with white space) because ``_FOLD``, which may begin
    with white space, is tried at every position of the value: about 10 us for a
    DKIM-Signature field, a tenth of the parse of a small message (issue 18).
    """
    if "\n" not in value:
        return _EOL.sub(" ", value) if "\r" in value else value
    lines = value.split("\n")
    out = lines[0]
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            # A fold: the white space (and CR) before the LF, the LF and the white
            # space after it become one space; an earlier fold's space goes too when
            # only white space lay between the two (one run of folds).
            if out[-1:] == "\r":
                out = out[:-1]
            out = out.rstrip(" \t") + " " + line.lstrip(" \t")
        else:
            out = out + "\n" + line
    return _EOL.sub(" ", out) if "\n" in out or "\r" in out else out


def raw_to_text(value: str, hint: str | None = None) -> tuple[str, str | None]:
    """Resolve 8-bit header bytes (carried as surrogate escapes) to text.

    RFC 6532 allows UTF-8 in headers; legacy mail carries raw Latin-1, Shift_JIS,
    GB2312 ... (see :func:`decode_header_bytes`; ``hint`` is the body charset).
    Returns (text, problem or None).
    """
    if _SURROGATES.search(value) is None:
        return value, None
    return decode_header_bytes(value.encode("ascii", "surrogateescape"), hint)


def _decode_b(text: str) -> bytes:
    data = text.encode("ascii", "replace")
    data += b"=" * (-len(data.rstrip(b"=")) % 4)
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        # drop the incomplete last quantum, as lenient decoders do
        cut = len(data.rstrip(b"=")) // 4 * 4
        return binascii.a2b_base64(data[:cut]) if cut else b""


def _decode_q(text: str) -> bytes:
    # RFC 2047 §4.2: "_" is space, =XX is an octet; a bad "=" stays literal
    data = text.replace("_", " ").encode("latin-1", "replace")
    return _QHEX.sub(lambda m: bytes([int(m.group(1), 16)]), data)


def decode_words(value: str) -> tuple[str, list[str]]:
    """Decode the RFC 2047 encoded-words in an unfolded header value; never raises.

    Adjacent encoded-words of one charset are joined as bytes before decoding, so a
    multi-byte character split across words survives; white space between encoded-words
    is dropped (RFC 2047 §6.2). Unknown charsets fall back to detection. Returns the
    text and a list of problems (empty when clean).
    """
    if "=?" not in value:
        return value, []
    problems: list[str] = []
    out: list[str] = []
    pending: bytearray = bytearray()
    pending_charset = ""
    pos = 0

    def flush() -> None:
        nonlocal pending_charset
        if pending_charset:
            text, problem = decode_text(bytes(pending), pending_charset)
            if problem is not None:
                problems.append(f"encoded-word: {problem}")
            out.append(text)
            pending.clear()
            pending_charset = ""

    for m in _WORD.finditer(value):
        between = value[pos : m.start()]
        if between and (not pending_charset or between.strip(" \t")):
            flush()
            out.append(between)
        charset = m.group(1).split("*", 1)[0].lower()
        try:
            data = (
                _decode_b(m.group(3)) if m.group(2) in "Bb" else _decode_q(m.group(3))
            )
        except Exception as exc:  # pragma: no cover - defensive
            problems.append(f"encoded-word: {type(exc).__name__}")
            flush()
            out.append(m.group(0))
            pos = m.end()
            continue
        if pending_charset and codec_for(charset) != codec_for(pending_charset):
            flush()
        if not pending_charset:
            pending_charset = charset
        pending.extend(data)
        pos = m.end()
    flush()
    out.append(value[pos:])
    return "".join(out), problems


def decode_header(value: str, hint: str | None = None) -> tuple[str, list[str]]:
    """Unfold, resolve 8-bit bytes and decode encoded-words; returns (text, problems).

    ``hint`` is the message's body charset, used for raw 8-bit header bytes.
    """
    text, problem = raw_to_text(unfold(value), hint)
    decoded, problems = decode_words(text)
    if problem is not None:
        problems.insert(0, problem)
    return decoded.strip(), problems
