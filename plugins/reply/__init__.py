"""Built-in plugin `reply`: the new text of a reply, quoted history and signature cut."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailpipe import hookimpl
from mailpipe.registry import lazy_exports

if TYPE_CHECKING:
    from .html import latest_reply_html
    from .processor import ReplyProcessor, reply_of
    from .rules import latest_reply

_LAZY = {
    "latest_reply": "rules",
    "latest_reply_html": "html",
    "ReplyProcessor": "processor",
    "reply_of": "processor",
}

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = ["ReplyProcessor", "latest_reply", "latest_reply_html", "reply_of"]


@hookimpl
def mailpipe_register_processors(register: Any) -> None:
    """Register the `reply` processor."""
    register.lazy("reply", f"{__name__}.processor:ReplyProcessor")
