"""Testing kit: a fault-injecting POP3 server, fixtures and fakes for mailpipe users."""

from mailpipe.testing.dovecot import Dovecot, DovecotError, DovecotUser

__all__ = [
    "Dovecot",
    "DovecotError",
    "DovecotUser",
]
