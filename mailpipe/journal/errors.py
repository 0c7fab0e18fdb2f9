"""Errors raised by journal backends."""

from __future__ import annotations

from mailpipe.errors import MailpipeError


class JournalError(MailpipeError):
    """The journal could not be opened or written; the session aborts."""


class SchemaVersionError(JournalError):
    """The journal's schema is newer than this mailpipe knows; upgrade mailpipe."""
