"""Built-in plugin `pop3`: the POP3 source (registered through the same hooks as third-party plugins)."""

from __future__ import annotations

from typing import Any

from mailpipe import hookimpl


@hookimpl
def mailpipe_register_sources(register: Any) -> None:
    """Register the ``pop3`` source."""
    from .source import Pop3Source

    register(Pop3Source)
