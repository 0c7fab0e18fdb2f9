"""The one JSON document of a message (``mailpipe.message/1``): stores and forwarders.

``store.jsonl`` writes it as a line, ``store.sqlite`` and ``store.postgres`` keep it as
their ``record`` column, and the broker forwarders and ``forward.webhook`` send it. It
is flat: the envelope (:data:`ENVELOPE`, from the message itself), then the fields of
the ``parse`` step's record, or, without a ``parse`` step, the few fields
:func:`minimal_record` reads from the headers. ``docs/message-document.md`` describes
every field; a test checks it against this module.

A change that removes or renames a field, or changes its meaning, is a new
:data:`SCHEMA` (``mailpipe.message/2``); adding a field is not.
"""

from __future__ import annotations

import base64
import email.utils
import json
from collections.abc import Collection
from datetime import datetime
from typing import Any, Final

from mailpipe.message import Message

#: The value of every document's ``schema`` field.
SCHEMA: Final = "mailpipe.message/1"

#: The fields every document starts with, in this order. ``key`` is first so that a
#: JSON line's key can be read from its first bytes (store.jsonl relies on it).
ENVELOPE: Final = (
    "key", "schema", "mailbox", "uid", "sha256", "size", "parsed", "tags",
)

#: Fields only some documents have: ``stored_at`` (written by a store) comes right
#: after ``size``; ``raw`` comes last in every document (null unless asked for).
STORED_AT: Final = "stored_at"
RAW: Final = "raw"


def message_document(
    message: Message,
    *,
    exclude: Collection[str] = (),
    stored_at: datetime | None = None,
    include_raw: bool = False,
) -> dict[str, Any]:
    """Return the ``mailpipe.message/1`` document of ``message``; never raises for
    bad mail.

    :param exclude: record fields to leave out (never an envelope field).
    :param stored_at: when a store writes the document; adds ``stored_at`` (ISO 8601,
        seconds). Forwarders leave it out, so a re-sent document is byte-identical.
    :param include_raw: put the raw message, base64-encoded, in ``raw`` (else null).
    """
    if message.record is not None:
        body = _record_dict(message.record)
        parsed = True
    else:
        body = minimal_record(message)
        parsed = False
    doc: dict[str, Any] = {
        "key": message.key,
        "schema": SCHEMA,
        "mailbox": message.ref.mailbox,
        "uid": message.ref.uid,
        "sha256": message.sha256,
        "size": message.size,
    }
    if stored_at is not None:
        doc[STORED_AT] = stored_at.isoformat(timespec="seconds")
    # Tags: the record's (set at parse time) and those later steps added since.
    doc["parsed"] = parsed
    doc["tags"] = sorted(set(body.get("tags") or ()) | set(message.tags))
    for name, value in body.items():
        if name not in doc and name != RAW and name not in exclude:
            doc[name] = value
    doc[RAW] = None
    if include_raw:
        with message.open() as f:
            doc[RAW] = base64.b64encode(f.read()).decode("ascii")
    return doc


def _record_dict(record: Any) -> dict[str, Any]:
    if hasattr(record, "model_dump"):
        dumped: dict[str, Any] = record.model_dump(mode="json")
        return dumped
    if isinstance(record, dict):
        return dict(record)
    return dict(vars(record))


def _header_addresses(message: Message, name: str) -> list[dict[str, str]]:
    value = message.header(name)
    if not value:
        return []
    try:
        pairs = email.utils.getaddresses([value])
    except Exception:
        return []
    return [{"name": n, "address": a} for n, a in pairs if a or n]


#: The largest message whose ``text`` :func:`minimal_record` extracts.
MINIMAL_TEXT_OCTETS = 4 << 20


def minimal_record(message: Message) -> dict[str, Any]:
    """Fields recoverable from the raw bytes without the ``parse`` step; never raises.

    Returns ``schema_version``, ``message_id``, ``subject``, ``date_raw``, the address
    lists and ``text`` (the first text/plain body, decoded by the stdlib). Headers
    come from the header section alone; ``text`` is None for a message over
    :data:`MINIMAL_TEXT_OCTETS`, which the stdlib would parse whole in memory (the
    ``parse`` step streams it).
    """
    doc: dict[str, Any] = {"schema_version": 1}
    mid = message.header("Message-ID")
    doc["message_id"] = mid.strip().strip("<>") if mid else None
    doc["subject"] = message.header("Subject")
    doc["date_raw"] = message.header("Date")
    for field, header in (
        ("from_addresses", "From"), ("sender", "Sender"), ("reply_to", "Reply-To"),
        ("to", "To"), ("cc", "Cc"), ("bcc", "Bcc"),
    ):
        doc[field] = _header_addresses(message, header)
    text: str | None = None
    try:
        if message.size > MINIMAL_TEXT_OCTETS:
            raise ValueError("too large for the stdlib parser")
        body = message.email.get_body(preferencelist=("plain",))
        if body is not None:
            content = body.get_content()
            text = content if isinstance(content, str) else None
    except Exception:
        text = None
    doc["text"] = text
    return doc


def encode(doc: dict[str, Any]) -> bytes:
    """Serialise ``doc`` as compact UTF-8 JSON; a lone surrogate (from a broken
    header) makes it escape everything as ASCII instead of failing."""
    try:
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), default=str)
        return text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(doc, ensure_ascii=True, separators=(",", ":"), default=str)
        return text.encode("ascii")
