"""Outlook ``.msg`` files (OLE compound documents) to text, HTML and attachments,
through ``extract-msg`` (the ``unwrap`` extra)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

#: MIME types under which mail clients attach Outlook items.
MSG_TYPES: Final = frozenset({"application/vnd.ms-outlook", "application/x-msg"})
#: The OLE compound file signature every .msg starts with ([MS-CFB] §2.2).
OLE_MAGIC: Final = bytes.fromhex("d0cf11e0a1b11ae1")


@dataclass
class OutlookItem:
    """What an Outlook .msg holds: subject, bodies and attachments."""

    subject: str | None = None
    text: str | None = None
    html: str | None = None
    attachments: list[tuple[str | None, str, bytes]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def may_be_msg(filename: str | None, content_type: str) -> bool:
    """True when an attachment's name or type says Outlook item: only then are its
    bytes worth reading for :func:`is_msg`."""
    return (filename or "").lower().endswith(".msg") or content_type in MSG_TYPES


def is_msg(filename: str | None, content_type: str, data: bytes) -> bool:
    """True for an attached Outlook item (by type or name, and the OLE signature)."""
    return may_be_msg(filename, content_type) and data[:8] == OLE_MAGIC


def read_msg(data: bytes) -> OutlookItem | str:
    """The item in ``data``, or a sentence saying why it could not be read."""
    try:
        import extract_msg
    except ImportError:
        return "extract-msg is not installed (the `unwrap` extra: pip install '.[unwrap]')"
    try:
        msg = extract_msg.openMsg(data, strict=False, delayAttachments=False)
    except Exception as exc:
        return f"not a readable Outlook item: {type(exc).__name__}: {exc}"[:300]
    try:
        return _item(msg)
    except Exception as exc:
        return f"Outlook item only partly readable: {type(exc).__name__}: {exc}"[:300]
    finally:
        try:
            msg.close()
        except Exception:
            pass


def _item(msg: Any) -> OutlookItem:
    item = OutlookItem(subject=getattr(msg, "subject", None))
    item.text = getattr(msg, "body", None) or None
    html = getattr(msg, "htmlBody", None)
    if isinstance(html, bytes):
        item.html = html.decode("utf-8", "replace")
    for att in getattr(msg, "attachments", None) or ():
        payload = getattr(att, "data", None)
        name = getattr(att, "longFilename", None) or getattr(att, "shortFilename", None)
        if not isinstance(payload, bytes):
            item.notes.append(f"attachment {name!r}: an embedded item, kept inside")
            continue
        ctype = (getattr(att, "mimetype", None) or "application/octet-stream").lower()
        item.attachments.append((name, ctype, payload))
    return item
