"""Built-in plugin `parse`: raw bytes to a versioned MessageRecord (see record.py)."""

from __future__ import annotations

from typing import Any

from mailpipe import hookimpl

from .parser import parse_message
from .processor import PAYLOADS_KEY, ParseProcessor, parse_into
from .record import Address, Attachment, Defect, MessageRecord

__all__ = [
    "PAYLOADS_KEY",
    "Address",
    "Attachment",
    "Defect",
    "MessageRecord",
    "ParseProcessor",
    "parse_into",
    "parse_message",
]


@hookimpl
def mailpipe_register_processors(register: Any) -> None:
    """Register the `parse` processor."""
    register(ParseProcessor)
