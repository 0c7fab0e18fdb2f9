"""Built-in plugin `parse` (registered through the same hooks as third-party plugins)."""

from __future__ import annotations

from typing import Any

from mailpipe import hookimpl


@hookimpl
def mailpipe_register_processors(register: Any) -> None:
    """Register this plugin's processors (none yet)."""
