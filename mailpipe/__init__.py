"""mailpipe: mailboxes as reliable data-pipeline sources.

Public API: :data:`hookimpl` for plugins, the message and processor types, and errors.
"""

from mailpipe import _imports  # noqa: F401  (first: see its docstring)
from mailpipe._version import __version__
from mailpipe.errors import (
    AuthenticationError,
    CommitError,
    ConfigError,
    MailpipeError,
    OversizeError,
    PermanentFailure,
    PluginError,
    ProcessorError,
    SourceBusyError,
    SourceConnectionError,
    SourceError,
    SourcePermanentError,
    SourceTimeoutError,
    TemporaryFailure,
)
from mailpipe.hookspecs import hookimpl
from mailpipe.message import Message, MessageRef, message_key
from mailpipe.processor import LATER, Decision, Disposition, Processor, ProcessorContext
from mailpipe.source import Source, SourceSession, Unretrievable

__all__ = [
    "LATER",
    "AuthenticationError",
    "CommitError",
    "ConfigError",
    "Decision",
    "Disposition",
    "MailpipeError",
    "Message",
    "MessageRef",
    "OversizeError",
    "PermanentFailure",
    "PluginError",
    "Processor",
    "ProcessorContext",
    "ProcessorError",
    "Source",
    "SourceBusyError",
    "SourceConnectionError",
    "SourceError",
    "SourcePermanentError",
    "SourceSession",
    "SourceTimeoutError",
    "TemporaryFailure",
    "Unretrievable",
    "__version__",
    "hookimpl",
    "message_key",
]
