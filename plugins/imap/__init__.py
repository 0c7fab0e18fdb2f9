"""Built-in plugin `imap`: the IMAP4 source (registered through the same hooks as third-party plugins)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailpipe import hookimpl

if TYPE_CHECKING:
    from mailpipe.registry import Register


@hookimpl
def mailpipe_register_sources(register: Register) -> None:
    """Register the ``imap`` source, imported when a mailbox uses it."""
    register.lazy("imap", f"{__name__}.source:ImapSource")
