"""Built-in plugin `pop3` (registered through the same hooks as third-party plugins)."""

from __future__ import annotations

from typing import Any

from mailpipe import hookimpl


@hookimpl
def mailpipe_register_sources(register: Any) -> None:
    """Register this plugin's sources (none yet)."""
