"""What an ``imap`` session knows of a folder: SELECT's answer, and where a listed
message is.

Contract: a :class:`_Folder` is rewritten by each SELECT of its folder (IC-24); a
:class:`_Where` names a listed message's folder (wire form) and UID for as long as its
session lives. :func:`_show` is for logs only.
"""

from dataclasses import dataclass

from . import mutf7


@dataclass(slots=True)
class _Folder:
    """What SELECT said about one folder (IC-24)."""

    wire: bytes
    uidvalidity: int | None = None
    uidnext: int | None = None
    exists: int = 0
    permanent_flags: tuple[str, ...] | None = None
    read_write: bool = True


@dataclass(slots=True)
class _Where:
    folder: bytes
    uid: int


def _show(wire: bytes) -> str:
    """A folder's display name for logs (its wire form when not valid mUTF-7)."""
    try:
        return mutf7.decode(wire)
    except ValueError:
        return wire.decode("ascii", "replace")
