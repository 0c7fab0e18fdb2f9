"""Errors raised by journal backends."""

from __future__ import annotations

from mailpipe.errors import MailpipeError


class JournalError(MailpipeError):
    """The journal could not be opened or written; the session aborts."""


class SchemaVersionError(JournalError):
    """The journal's schema is newer than this mailpipe knows; upgrade mailpipe."""


class JournalMissingError(JournalError):
    """A read-only open found no journal yet (no ``mailpipe run`` has created it)."""


class SchemaOutdatedError(JournalError):
    """A read-only open found an older schema; the next ``mailpipe run`` migrates it."""
