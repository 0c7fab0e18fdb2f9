"""Built-in plugin `ticket`: ticket ids from subject tags and the thread's Message-IDs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailpipe import hookimpl
from mailpipe.registry import lazy_exports

if TYPE_CHECKING:
    from .keys import DEFAULT_PATTERNS, SubjectRules, ticket_keys
    from .processor import TicketOptions, TicketProcessor

_LAZY = {
    "DEFAULT_PATTERNS": "keys",
    "SubjectRules": "keys",
    "ticket_keys": "keys",
    "TicketOptions": "processor",
    "TicketProcessor": "processor",
}

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "DEFAULT_PATTERNS", "SubjectRules", "TicketOptions", "TicketProcessor", "ticket_keys"
]


@hookimpl
def mailpipe_register_processors(register: Any) -> None:
    """Register the `ticket` processor."""
    register.lazy("ticket", f"{__name__}.processor:TicketProcessor")
