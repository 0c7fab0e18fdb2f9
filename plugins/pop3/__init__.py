"""Built-in plugin `pop3`: the POP3 source (registered through the same hooks as third-party plugins)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailpipe import hookimpl

if TYPE_CHECKING:
    from mailpipe.registry import Register


@hookimpl
def mailpipe_register_sources(register: Register) -> None:
    """Register the ``pop3`` source, imported when a mailbox uses it."""
    register.lazy("pop3", f"{__name__}.source:Pop3Source")
