"""Built-in plugin `parse`: raw bytes to a versioned MessageRecord (see record.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailpipe import hookimpl
from mailpipe.registry import lazy_exports

if TYPE_CHECKING:
    from mailpipe.registry import Register

    from .parser import MAX_PARTS, parse_file, parse_message
    from .processor import PAYLOADS_KEY, ParseProcessor, parse_into
    from .record import Address, Attachment, Defect, MessageRecord
    from .spool import SpooledPayload

#: Public names and their modules: imported on first use (PEP 562), so that loading
#: the plugin costs nothing until a configuration uses `parse`.
_LAZY = {
    "parse_message": "parser",
    "parse_file": "parser",
    "SpooledPayload": "spool",
    "MAX_PARTS": "parser",
    "PAYLOADS_KEY": "processor",
    "ParseProcessor": "processor",
    "parse_into": "processor",
    "Address": "record",
    "Attachment": "record",
    "Defect": "record",
    "MessageRecord": "record",
}

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "MAX_PARTS",
    "PAYLOADS_KEY",
    "Address",
    "Attachment",
    "Defect",
    "MessageRecord",
    "ParseProcessor",
    "SpooledPayload",
    "parse_file",
    "parse_into",
    "parse_message",
]


@hookimpl
def mailpipe_register_processors(register: Register) -> None:
    """Register the `parse` processor."""
    register.lazy("parse", f"{__name__}.processor:ParseProcessor")
