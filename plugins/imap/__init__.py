"""Built-in plugin `imap`: the IMAP4 source (registered through the same hooks as third-party plugins)."""

from __future__ import annotations

from typing import Any

from mailpipe import hookimpl


@hookimpl
def mailpipe_register_sources(register: Any) -> None:
    """Register the ``imap`` source."""
    from .source import ImapSource

    register(ImapSource)
