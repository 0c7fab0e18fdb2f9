"""The mailpipe exception hierarchy; every error a user can see derives from MailpipeError."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class MailpipeError(Exception):
    """Root of all mailpipe errors; never raised itself."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One configuration problem: a dotted key path, a message and the offending value."""

    loc: str
    msg: str
    value: str | None = None

    def render(self) -> str:
        """Return ``loc: msg (got VALUE)``; the value is omitted when unknown."""
        got = f" (got {self.value})" if self.value is not None else ""
        where = f"{self.loc}: " if self.loc else ""
        return f"{where}{self.msg}{got}"


class ConfigError(MailpipeError):
    """The configuration file is invalid; ``str()`` is the whole report, all problems at once."""

    def __init__(self, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(self.report())

    def report(self) -> str:
        """Render ``FILE: N problem(s)`` followed by one indented line per problem."""
        n = len(self.problems)
        head = f"{self.path}: {n} problem{'s' if n != 1 else ''}"
        return "\n".join([head, *(f"  {p.render()}" for p in self.problems)])


class StartupError(MailpipeError):
    """Something ``run`` needs could not be set up (the metrics port is taken...)."""


class PluginError(MailpipeError):
    """A plugin failed to import, clashed on a name, or implemented a hook wrongly."""


class SourceError(MailpipeError):
    """Anything the mailbox side got wrong; the session is aborted, nothing is deleted."""


class SourceConnectionError(SourceError, ConnectionError):
    """The connection failed or dropped; retried with back-off."""


class SourceTimeoutError(SourceError, TimeoutError):
    """A phase (connect, TLS, greeting, read) exceeded its timeout; retried with back-off."""


class AuthenticationError(SourceError):
    """The server rejected the credentials; the scheduler backs off long and logs loudly."""


class SourceBusyError(SourceError):
    """A temporary refusal (RFC 2449/3206 IN-USE, LOGIN-DELAY, SYS/TEMP); back off and retry.

    ``code`` is the response code, ``retry_after`` a server-suggested delay in seconds.
    """

    def __init__(
        self, message: str, *, code: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


class SourcePermanentError(SourceError):
    """A permanent refusal (RFC 3206 SYS/PERM, or an account problem); stop hammering."""

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class UidlResetSuspected(SourcePermanentError):
    """Keep mode: most listed uids are new and most kept ones vanished (C-60).

    The server probably renamed its uids; processing would run the kept mail again.
    Nothing was processed; the message says how to adopt the mail or ingest it.
    """


class OversizeError(SourceError):
    """The server sent more of one message than a size limit allows; nothing was kept.

    Raised while the message is still arriving (the transfer stops at the limit, so a
    server whose LIST understates a size cannot make mailpipe buffer or spool the rest);
    the connection is closed without QUIT, so nothing is committed or deleted. ``number``
    is the session's message number, ``ref`` the :class:`mailpipe.message.MessageRef`
    when the source knows it, ``limit`` the octets allowed and ``received`` the octets
    seen when the transfer stopped; ``hard`` is True for the source's absolute cap
    (``max_message``), False for the mailbox policy (``max_message_size``). The engine
    applies ``on_oversize`` to ``ref`` (see docs: "Size limits").
    """

    def __init__(
        self,
        message: str,
        *,
        number: int,
        limit: int,
        received: int,
        hard: bool = False,
        ref: Any = None,
    ) -> None:
        super().__init__(message)
        self.number = number
        self.limit = limit
        self.received = received
        self.hard = hard
        self.ref = ref


class CommitError(SourceError):
    """QUIT did not confirm the deletions; the journal keeps them pending for next time."""


class ProcessorError(MailpipeError):
    """A processor failed on one message; the message stays on the server.

    ``processor`` names the step, ``uid`` the message; raised ``from`` the original error.
    """

    def __init__(self, message: str, *, processor: str = "", uid: str = "") -> None:
        super().__init__(message)
        self.processor = processor
        self.uid = uid


class TemporaryFailure(MailpipeError):
    """Raised by a processor when a retry later may succeed (SMTP 4xx, HTTP 5xx, broker down).

    The message stays on the server and the attempt does not count towards quarantine.
    """


class PermanentFailure(MailpipeError):
    """Raised by a processor when retrying cannot help (SMTP 5xx, HTTP 4xx).

    The attempt counts towards ``max_attempts``; any other exception counts the same way.
    """


class BudgetExceeded(PermanentFailure):
    """A synchronous processor call ran past its pipeline's ``processing_budget``.

    The call was abandoned, not stopped (a thread cannot be killed; see
    :mod:`mailpipe.worker`): its outcome is unknown, so the message is quarantined at
    once with this error instead of being retried (``final``). So is a message whose
    earlier steps spent the budget before a call could start.

    ``final`` is False when the budget ran out while the call waited for its thread
    to begin it (a starved thread, the machine busy): nothing of it ran, so the
    message is retried like any failure, the attempt counted towards
    ``max_attempts``.
    """

    def __init__(self, message: str, *, processor: str = "", final: bool = True) -> None:
        super().__init__(message)
        self.processor = processor
        self.final = final
