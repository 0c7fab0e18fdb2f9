"""The JSON document the broker forwarders publish, and their shared options."""

from __future__ import annotations

import base64
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mailpipe.message import Message
from mailpipe.units import Duration

#: Header (NATS, AMQP) carrying the message key beside the broker's own id field.
KEY_HEADER = "X-Mailpipe-Key"


class BrokerOptions(BaseModel):
    """Options every broker forwarder has."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    include_raw: bool = Field(
        strict=True,
        default=False, description="Add the raw message, base64-encoded, as 'raw'."
    )
    timeout: Duration = Field(
        default=10.0,
        gt=0,
        description="Timeout of connecting and of waiting for the broker's ack.",
    )


def document(message: Message, *, include_raw: bool) -> dict[str, Any]:
    """Return ``{"key", "mailbox", "uid", "tags", "record", "raw"}`` for ``message``.

    ``record`` is the parse step's record as JSON (None without a parse step); ``raw``
    is the base64 of the raw bytes when ``include_raw``, else None.
    """
    record = message.record
    if record is not None and hasattr(record, "model_dump"):
        record = record.model_dump(mode="json")
    raw = None
    if include_raw:
        with message.open() as f:
            raw = base64.b64encode(f.read()).decode("ascii")
    return {
        "key": message.key,
        "mailbox": message.ref.mailbox,
        "uid": message.ref.uid,
        "tags": sorted(message.tags),
        "record": record,
        "raw": raw,
    }


def encode(doc: dict[str, Any]) -> bytes:
    """Serialise ``doc`` as compact UTF-8 JSON (lone surrogates escaped, not fatal)."""
    try:
        return json.dumps(
            doc, ensure_ascii=False, separators=(",", ":"), default=str
        ).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(
            doc, ensure_ascii=True, separators=(",", ":"), default=str
        ).encode("ascii")
