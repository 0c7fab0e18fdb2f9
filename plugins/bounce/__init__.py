"""Built-in plugin `bounce`: delivery reports (RFC 3464 DSNs and non-standard ones)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailpipe import hookimpl
from mailpipe.registry import lazy_exports

if TYPE_CHECKING:
    from .dsn import parse_delivery_status
    from .nonstandard import looks_like_bounce, parse_nonstandard
    from .processor import BounceOptions, BounceProcessor

_LAZY = {
    "parse_delivery_status": "dsn",
    "looks_like_bounce": "nonstandard",
    "parse_nonstandard": "nonstandard",
    "BounceOptions": "processor",
    "BounceProcessor": "processor",
}

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "BounceOptions", "BounceProcessor", "looks_like_bounce", "parse_delivery_status",
    "parse_nonstandard",
]


@hookimpl
def mailpipe_register_processors(register: Any) -> None:
    """Register the `bounce` processor."""
    register.lazy("bounce", f"{__name__}.processor:BounceProcessor")
