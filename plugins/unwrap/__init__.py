"""Built-in plugin `unwrap`: S/MIME, PGP/MIME, TNEF and Outlook .msg envelopes opened
or marked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailpipe import hookimpl
from mailpipe.registry import lazy_exports

if TYPE_CHECKING:
    from .cms import content_type, signed_content
    from .outlook import read_msg
    from .processor import UnwrapOptions, UnwrapProcessor

_LAZY = {
    "content_type": "cms",
    "signed_content": "cms",
    "read_msg": "outlook",
    "UnwrapOptions": "processor",
    "UnwrapProcessor": "processor",
}

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = ["UnwrapOptions", "UnwrapProcessor", "content_type", "read_msg",
           "signed_content"]


@hookimpl
def mailpipe_register_processors(register: Any) -> None:
    """Register the `unwrap` processor."""
    register.lazy("unwrap", f"{__name__}.processor:UnwrapProcessor")
