"""Charset handling: aliases, supersets and detection for unknown or lying charsets."""

from __future__ import annotations

import codecs
import re
from functools import lru_cache

#: Labels seen in real mail that Python does not know, or knows under a narrower codec.
#: Supersets are preferred (WHATWG Encoding Standard practice): mail labelled with the
#: narrow charset routinely carries the vendor extensions.
_ALIASES: dict[str, str] = {
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "ksc5601": "cp949",
    "euc-kr": "cp949",
    "euc_kr": "cp949",
    "x-euc-kr": "cp949",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cn-gb": "gb18030",
    "euc-cn": "gb18030",
    "big5": "big5hkscs",
    "x-big5": "big5hkscs",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "windows-31j": "cp932",
    "csshiftjis": "cp932",
    "iso-2022-jp": "iso2022_jp_ext",
    "csiso2022jp": "iso2022_jp_ext",
    "euc-jp": "euc_jis_2004",
    "x-euc-jp": "euc_jis_2004",
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "iso_8859-1": "cp1252",
    "iso-8859-9": "cp1254",
    "iso-8859-11": "cp874",
    "tis-620": "cp874",
    "x-mac-roman": "mac_roman",
    "macintosh": "mac_roman",
    "unicode-1-1-utf-7": "utf-7",
    "utf8": "utf-8",
    "x-unicode20utf8": "utf-8",
    "x-user-defined": "cp1252",
    "iso-8859-8-i": "iso-8859-8",
    "cp-850": "cp850",
    "windows-874": "cp874",
    "koi8-ru": "koi8_u",
}

#: Codecs whose ASCII-only bytes do not mean ASCII text.
_ASCII_UNSAFE = {
    "utf-7",
    "utf-16",
    "utf-16-le",
    "utf-16-be",
    "utf-32",
    "utf-32-le",
    "utf-32-be",
    "iso2022_jp",
    "iso2022_jp_1",
    "iso2022_jp_2",
    "iso2022_jp_2004",
    "iso2022_jp_3",
    "iso2022_jp_ext",
    "iso2022_kr",
    "hz",
}

#: Single-byte Western charsets that mail often declares for UTF-8 bytes.
_WESTERN = {"ascii", "cp1252", "latin-1", "iso8859-15"}

#: Python codecs that are not text encodings and must never be used for mail text.
_NOT_TEXT = {
    "base64",
    "hex",
    "quopri",
    "uu",
    "zlib",
    "bz2",
    "rot13",
    "punycode",
    "idna",
}


@lru_cache(maxsize=512)
def codec_for(label: str | None) -> str | None:
    """Return a Python codec name for a MIME charset label, or None when unknown."""
    if not label:
        return None
    name = label.strip().strip("\"'").lower()
    if name.startswith("charset="):  # seen: charset="charset=us-ascii"
        name = name[8:].strip("\"'")
    name = name.split("*", 1)[0]  # RFC 2231 language suffix "utf-8*en"
    name = _ALIASES.get(name, name)
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    if info.name in _NOT_TEXT or info.name.endswith("_codec"):
        return None
    return info.name


def _detect(data: bytes) -> str | None:
    from charset_normalizer import from_bytes

    try:
        best = from_bytes(data[:65536], steps=5, chunk_size=512, threshold=0.3).best()
    except Exception:
        return None
    if best is None:
        return None
    codec = codec_for(best.encoding)
    # a guess of UTF-16/32/7 or ISO-2022 for mail bytes is noise: those are declared
    return None if codec in _ASCII_UNSAFE else codec


def decode_text(data: bytes, label: str | None) -> tuple[str, str | None]:
    """Decode ``data`` declared as charset ``label``; never raises.

    Returns (text, problem); ``problem`` is None when the declared charset (or plain
    ASCII) decoded cleanly, else a short explanation for a defect entry. Order: ASCII
    fast path (ISO-2022-JP escapes recognised even when undeclared); UTF-8 first when a
    Western single-byte charset is declared (the most common lie); the declared charset
    through superset aliases; UTF-8; a detected charset (charset-normalizer); finally
    the declared codec or UTF-8 with U+FFFD replacements.
    """
    codec = codec_for(label)
    unknown = f"unknown charset {label!r}" if label and codec is None else None
    if codec is not None and codec in _ASCII_UNSAFE:
        try:
            return data.decode(codec), None
        except (UnicodeDecodeError, LookupError):
            pass
    elif data.isascii():
        if b"\x1b" in data and (codec is None or codec in _WESTERN):
            try:
                # ESC $ B / ESC ( J are ISO-2022-JP (RFC 1468) even when unlabelled
                return data.decode("iso2022_jp_ext"), _why(label, codec, "iso-2022-jp")
            except UnicodeDecodeError:
                pass
        return data.decode("ascii"), unknown
    if codec in _WESTERN:
        try:
            return data.decode("utf-8"), _why(label, codec, "utf-8")
        except UnicodeDecodeError:
            pass
    if codec is not None:
        try:
            return data.decode(codec), None
        except (UnicodeDecodeError, LookupError):
            pass
    if codec != "utf-8":
        try:
            return data.decode("utf-8"), _why(label, codec, "utf-8")
        except UnicodeDecodeError:
            pass
    longest = max((len(m) for m in _HIGH_RUN.findall(data)), default=0)
    if longest <= 2 and codec is None:
        # Isolated high octets in text with an unknown charset are Latin text (é, ü)
        # far more often than anything a detector guesses from a few bytes.
        for latin in ("cp1252", "latin-1"):
            try:
                return data.decode(latin), _why(label, codec, latin)
            except UnicodeDecodeError:
                continue
    detected = _detect(data)
    if detected is not None:
        try:
            return data.decode(detected), _why(label, codec, detected)
        except (UnicodeDecodeError, LookupError):
            pass
    fallback = codec or "utf-8"
    return data.decode(fallback, "replace"), (
        f"could not decode as {label or 'undeclared charset'}; "
        "replaced invalid bytes (raw bytes kept)"
    )


def _why(label: str | None, codec: str | None, used: str) -> str:
    if not label:
        return f"no charset declared; decoded as {used}"
    if codec is None:
        return f"unknown charset {label!r}; decoded as {used}"
    return f"bytes invalid in declared {label!r}; decoded as {used}"


_HIGH_RUN = re.compile(rb"[\x80-\xff]+")


def decode_header_bytes(data: bytes, hint: str | None) -> tuple[str, str | None]:
    """Decode raw 8-bit header bytes; returns (text, problem or None); never raises.

    RFC 6532 allows only UTF-8 there; legacy mail uses the body's charset (``hint``),
    Latin text (isolated high octets: cp1252) or a CJK/Cyrillic charset (runs of high
    octets: detection).
    """
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", "replace")
    bad = text.count("\ufffd")
    if bad * 40 <= len(text) and len(text) - bad > len(text.encode("ascii", "ignore")):
        # mostly valid UTF-8 (e.g. a name truncated mid-character)
        return text, "8-bit header: invalid UTF-8 bytes replaced"
    codec = codec_for(hint)
    if codec is not None and codec not in ("ascii", "utf-8"):
        try:
            return data.decode(codec), f"8-bit header decoded as {codec} (body charset)"
        except (UnicodeDecodeError, LookupError):
            pass
    longest = max((len(m) for m in _HIGH_RUN.findall(data)), default=0)
    if longest > 2:
        detected = _detect(data)
        if detected is not None and detected not in ("ascii", "utf-8"):
            try:
                return data.decode(detected), f"8-bit header decoded as {detected}"
            except (UnicodeDecodeError, LookupError):
                pass
    return data.decode("cp1252", "replace"), "8-bit header decoded as cp1252"
