"""A minimal Outlook ``.msg`` writer for tests: an OLE compound file ([MS-CFB],
version 3, 512-octet sectors, a mini stream for streams under 4096 octets) holding
the [MS-OXMSG] storages and streams of one message with attachments.

Only what readers need to see a message: the class, subject, plain body and, per
attachment, file name, MIME type, data and the attach method (by value). No named
properties, recipients or RTF. Built so that tests can feed real ``.msg`` bytes to
``extract-msg`` without shipping a binary sample.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from typing import Final, Union

_SECTOR: Final = 512
_MINI: Final = 64
_CUTOFF: Final = 4096
_FREE: Final = 0xFFFFFFFF
_END: Final = 0xFFFFFFFE
_FATSECT: Final = 0xFFFFFFFD
_NONE: Final = 0xFFFFFFFF
_ENTRY: Final = struct.Struct("<64sHBBIII16sIQQIQ")

Tree = dict[str, Union[bytes, "Tree"]]


def _chain(first: int, count: int) -> list[int]:
    return [first + k + 1 if k < count - 1 else _END for k in range(count)]


def compound_file(tree: Tree) -> bytes:
    """The compound file of ``tree`` (name → stream bytes, or → a storage dict)."""
    names: list[str] = []
    kinds: list[int] = []
    datas: list[bytes | None] = []
    kids: list[list[int]] = []

    def add(name: str, node: bytes | Tree, kind: int) -> int:
        index = len(names)
        names.append(name)
        kinds.append(kind)
        datas.append(node if isinstance(node, bytes) else None)
        kids.append([])
        if isinstance(node, dict):
            for key, value in node.items():
                kids[index].append(add(key, value, 1 if isinstance(value, dict) else 2))
        return index

    add("Root Entry", tree, 5)
    starts: dict[int, int] = {}
    mini = b""
    minifat: list[int] = []
    for i, data in enumerate(datas):
        if data is not None and 0 < len(data) < _CUTOFF:
            count = -(-len(data) // _MINI)
            starts[i] = len(minifat)
            minifat += _chain(len(minifat), count)
            mini += data.ljust(count * _MINI, b"\0")
    datas[0] = mini  # the root entry's stream is the mini stream
    sectors: list[bytes] = []
    fat: list[int] = []

    def put(data: bytes) -> int:
        count = -(-len(data) // _SECTOR)
        first = len(sectors)
        sectors.extend(data[k * _SECTOR:(k + 1) * _SECTOR].ljust(_SECTOR, b"\0")
                       for k in range(count))
        fat.extend(_chain(first, count))
        return first

    for i, data in enumerate(datas):
        if i not in starts:
            starts[i] = put(data) if data else _END
    # siblings as a chain of right children, in the [MS-CFB] 2.6.4 order
    right = [_NONE] * len(names)
    child = [_NONE] * len(names)
    for i, members in enumerate(kids):
        ordered = sorted(members, key=lambda m: (len(names[m]), names[m].upper()))
        if ordered:
            child[i] = ordered[0]
            for a, b in itertools.pairwise(ordered):
                right[a] = b
    directory = b"".join(
        _ENTRY.pack((n.encode("utf-16-le") + b"\0\0").ljust(64, b"\0"),
                    2 * len(n) + 2, kinds[i], 1, _NONE, right[i], child[i], b"\0" * 16,
                    0, 0, 0, starts[i] if datas[i] is not None else 0,
                    len(datas[i] or b""))
        for i, n in enumerate(names)
    )
    directory += _ENTRY.pack(b"", 0, 0, 0, _NONE, _NONE, _NONE, b"\0" * 16, 0, 0, 0, 0,
                             0) * (-(len(directory) // 128) % 4)
    dir_first = put(directory)
    minifat_first, minifat_count = _END, 0
    if minifat:
        minifat += [_FREE] * (-len(minifat) % 128)
        minifat_first = put(struct.pack(f"<{len(minifat)}I", *minifat))
        minifat_count = len(minifat) // 128
    fat_count = 1
    while len(sectors) + fat_count > fat_count * 128:
        fat_count += 1
    fat_first = len(sectors)
    fat += [_FATSECT] * fat_count
    fat += [_FREE] * (fat_count * 128 - len(fat))
    fat_bytes = struct.pack(f"<{len(fat)}I", *fat)
    sectors.extend(fat_bytes[k * _SECTOR:(k + 1) * _SECTOR] for k in range(fat_count))
    header = struct.pack(
        "<8s16sHHHHH6sIIIIIIIII", bytes.fromhex("d0cf11e0a1b11ae1"), b"\0" * 16,
        0x3E, 3, 0xFFFE, 9, 6, b"\0" * 6, 0, fat_count, dir_first, 0, _CUTOFF,
        minifat_first, minifat_count, _END, 0,
    )
    difat = [fat_first + k for k in range(fat_count)] + [_FREE] * (109 - fat_count)
    return header + struct.pack("<109I", *difat) + b"".join(sectors)


def _text(value: str) -> bytes:
    return value.encode("utf-16-le")


def outlook_msg(
    subject: str, body: str, attachments: Sequence[tuple[str, str, bytes]] = ()
) -> bytes:
    """The ``.msg`` bytes of an IPM.Note with ``attachments`` (name, MIME type, data)."""
    count = len(attachments)
    tree: Tree = {
        # top-level property stream header: reserved, next ids, counts ([MS-OXMSG] 2.4.1)
        "__properties_version1.0": b"\0" * 8 + struct.pack("<IIII", 0, count, 0, count)
        + b"\0" * 8,
        "__substg1.0_001A001F": _text("IPM.Note"),
        "__substg1.0_0037001F": _text(subject),
        "__substg1.0_1000001F": _text(body),
        "__nameid_version1.0": {
            "__substg1.0_00020102": b"", "__substg1.0_00030102": b"",
            "__substg1.0_00040102": b"",
        },
    }
    for n, (name, mime, data) in enumerate(attachments):
        # PidTagAttachMethod (0x3705, PT_LONG) = 1: attached by value
        method = struct.pack("<IIQ", (0x3705 << 16) | 0x0003, 6, 1)
        tree[f"__attach_version1.0_#{n:08X}"] = {
            "__properties_version1.0": b"\0" * 8 + method,
            "__substg1.0_3707001F": _text(name),
            "__substg1.0_3704001F": _text(name[:8]),
            "__substg1.0_370E001F": _text(mime),
            "__substg1.0_37010102": data,
        }
    return compound_file(tree)
