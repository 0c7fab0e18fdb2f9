"""Errors raised by journal backends."""

from __future__ import annotations

from mailpipe.errors import MailpipeError


class JournalError(MailpipeError):
    """The journal could not be opened or written; the session aborts."""


class SchemaVersionError(JournalError):
    """The journal's schema is newer than this mailpipe knows; upgrade mailpipe."""


class FencedError(JournalError):
    """A write fenced by a lease epoch that is no longer current was refused (rolled
    back): another worker owns the mailbox now. The session aborts without
    acknowledging anything; the new owner finishes the work."""


class JournalMissingError(JournalError):
    """A read-only open found no journal yet (no ``mailpipe run`` has created it)."""


class SchemaOutdatedError(JournalError):
    """A read-only open found an older schema; the next ``mailpipe run`` migrates it."""
