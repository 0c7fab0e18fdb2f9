"""Testing kit: a fault-injecting POP3 server, a private Dovecot, sinks and fixtures.

``SmtpSink`` and ``HttpSink`` are imported on first use (they need aiosmtpd).
The pytest fixtures live in :mod:`mailpipe.testing.pytest_plugin`.
"""

from typing import Any

from mailpipe.testing.dovecot import Dovecot, DovecotError, DovecotUser
from mailpipe.testing.faults import Faults
from mailpipe.testing.server import Pop3Server, SessionRecord, dot_stuff, wire_form
from mailpipe.testing.transcript import Entry, Transcript

__all__ = [
    "Dovecot",
    "DovecotError",
    "DovecotUser",
    "Entry",
    "Faults",
    "HttpSink",
    "Pop3Server",
    "SessionRecord",
    "SmtpSink",
    "Transcript",
    "dot_stuff",
    "wire_form",
]

_LAZY = {"SmtpSink", "HttpSink"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from mailpipe.testing import sinks

        return getattr(sinks, name)
    raise AttributeError(f"module 'mailpipe.testing' has no attribute {name!r}")
