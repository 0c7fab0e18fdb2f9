"""Built-in plugin `extract`: text of PDF, Office, ODF, HTML and CSV attachments."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailpipe import hookimpl
from mailpipe.registry import lazy_exports

if TYPE_CHECKING:
    from .formats import FORMATS, ExtractError, extract, format_of
    from .processor import ExtractOptions, ExtractProcessor

_LAZY = {
    "FORMATS": "formats",
    "ExtractError": "formats",
    "extract": "formats",
    "format_of": "formats",
    "ExtractOptions": "processor",
    "ExtractProcessor": "processor",
}

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = ["FORMATS", "ExtractError", "ExtractOptions", "ExtractProcessor", "extract",
           "format_of"]


@hookimpl
def mailpipe_register_processors(register: Any) -> None:
    """Register the `extract` processor."""
    register.lazy("extract", f"{__name__}.processor:ExtractProcessor")
