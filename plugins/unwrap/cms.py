"""Just enough BER/DER (X.690) to read a CMS ContentInfo (RFC 5652): its content type
and, for SignedData, the encapsulated content. Definite and indefinite lengths,
constructed OCTET STRINGs; bounded depth; pure, never raises (returns None)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: RFC 5652 §3, §5, §6; RFC 5083.
SIGNED_DATA: Final = "1.2.840.113549.1.7.2"
ENVELOPED_DATA: Final = "1.2.840.113549.1.7.3"
AUTH_ENVELOPED_DATA: Final = "1.2.840.113549.1.9.16.1.23"
COMPRESSED_DATA: Final = "1.2.840.113549.1.9.16.1.9"
MAX_DEPTH: Final = 32
#: Longest OID (content octets) and longest arc (octets) read; longer is malformed
#: here: decoded whole, one arc of n octets costs O(n**2) shifts and str() fails
#: past 4300 digits. Every OID CMS uses is far below both.
MAX_OID_OCTETS: Final = 64
MAX_ARC_OCTETS: Final = 8


class _Bad(Exception):
    """Malformed input (internal; the public functions return None)."""


@dataclass(frozen=True, slots=True)
class _Node:
    tag: int
    constructed: bool
    start: int  # first content octet
    end: int  # after the last content octet (before an end-of-contents for indefinite)
    next: int  # after the whole element


def _node(data: bytes, pos: int, depth: int = 0) -> _Node:
    if depth > MAX_DEPTH or pos + 2 > len(data):
        raise _Bad
    first = data[pos]
    pos += 1
    tag = first  # the identifier octet (0x06 OID, 0x30 SEQUENCE, 0xA0 [0], ...)
    if first & 0x1F == 0x1F:  # high tag number form: tags no CMS field here uses
        tag = -1
        while True:
            if pos >= len(data):
                raise _Bad
            pos += 1
            if not data[pos - 1] & 0x80:
                break
    constructed = bool(first & 0x20)
    length = data[pos]
    pos += 1
    if length == 0x80:  # indefinite: children until end-of-contents
        if not constructed:
            raise _Bad
        child = pos
        while True:
            if child + 2 > len(data):
                raise _Bad
            if data[child] == 0 and data[child + 1] == 0:
                return _Node(tag, constructed, pos, child, child + 2)
            child = _node(data, child, depth + 1).next
    if length & 0x80:
        n = length & 0x7F
        if n > 8 or pos + n > len(data):
            raise _Bad
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise _Bad
    return _Node(tag, constructed, pos, pos + length, pos + length)


def _children(data: bytes, node: _Node, depth: int) -> list[_Node]:
    out, pos = [], node.start
    while pos < node.end:
        child = _node(data, pos, depth + 1)
        out.append(child)
        pos = child.next
    return out


def _oid(data: bytes, node: _Node) -> str:
    raw = data[node.start : node.end]
    if not raw or len(raw) > MAX_OID_OCTETS:
        raise _Bad
    parts = [min(raw[0] // 40, 2), raw[0] - 40 * min(raw[0] // 40, 2)]
    value, octets = 0, 0
    for b in raw[1:]:
        value = (value << 7) | (b & 0x7F)
        octets += 1
        if octets > MAX_ARC_OCTETS:
            raise _Bad
        if not b & 0x80:
            parts.append(value)
            value, octets = 0, 0
    return ".".join(map(str, parts))


def _octets(data: bytes, node: _Node, depth: int) -> bytes:
    """An OCTET STRING's value, its chunks joined when constructed (BER)."""
    if not node.constructed:
        return data[node.start : node.end]
    if depth > MAX_DEPTH:
        raise _Bad
    return b"".join(_octets(data, c, depth + 1) for c in _children(data, node, depth))


def content_type(der: bytes) -> str | None:
    """The OID of a ContentInfo's content type, or None when ``der`` is not one."""
    try:
        top = _node(der, 0)
        kids = _children(der, top, 0)
        return _oid(der, kids[0]) if kids and kids[0].tag == 0x06 else None
    except (_Bad, ValueError, IndexError):
        return None


def signed_content(der: bytes) -> bytes | None:
    """The encapsulated content of a SignedData ContentInfo (opaque signing), or None
    (not SignedData, detached, or malformed)."""
    try:
        top = _node(der, 0)
        info = _children(der, top, 0)
        if len(info) < 2 or _oid(der, info[0]) != SIGNED_DATA:
            return None
        (signed,) = _children(der, info[1], 1)  # [0] EXPLICIT SignedData
        fields = _children(der, signed, 2)
        encap = _children(der, fields[2], 3)  # version, digestAlgorithms, encap...
        if len(encap) < 2:
            return None  # detached signature: no eContent
        (octets,) = _children(der, encap[1], 4)  # [0] EXPLICIT OCTET STRING
        return _octets(der, octets, 5)
    except (_Bad, ValueError, IndexError):
        return None
