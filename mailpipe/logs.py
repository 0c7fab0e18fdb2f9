"""structlog configuration, applied once by the CLI; includes secret redaction.

On a terminal (console format, stderr a TTY) every log line, structlog's and the
standard library's, is printed through one rich Console (:func:`terminal`), the one
:class:`mailpipe.progress.ProgressView` draws its bars on: rich prints each line above
the live bars instead of into them. Per-session chatter is quiet there at ``info``
(:func:`_quiet_chatter`); ``--log-level debug`` shows it. Piped or with
``--log-format json``, output is JSON lines, one per event, and rich is not imported.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, Literal, TextIO

import structlog

from mailpipe.secrets import redact

if TYPE_CHECKING:
    from rich.console import Console

LogFormat = Literal["console", "json", "auto"]
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return value


def redact_secrets(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: mask every configured secret value in every field.

    Runs after exception formatting, so tracebacks are scrubbed too.
    """
    return {k: _scrub(v) for k, v in event.items()}


class _RedactingFilter(logging.Filter):
    """stdlib logging filter: third-party records (httpx, psycopg...) are redacted too."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


_terminal: Console | None = None
_live = False  # a progress display is on screen (ProgressView)
_on_terminal = False  # configure() chose the terminal path


def on_terminal() -> bool:
    """True when logs print through :func:`terminal` (progress bars may be drawn)."""
    return _on_terminal

#: Fields that make an event per-session or per-message chatter.
_SESSION_FIELDS = ("mailbox", "uid", "key")


def terminal() -> Console:
    """The one rich Console on stderr that terminal logs and progress bars share."""
    global _terminal
    if _terminal is None:
        from rich.console import Console

        _terminal = Console(file=sys.stderr)
    return _terminal


def set_live(live: bool) -> None:
    """Tell the log filter whether progress bars are on screen (ProgressView)."""
    global _live
    _live = live


def _quiet_chatter(_logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor for the terminal at ``info``: drop info events about one
    session or message (they carry ``mailbox``, ``uid`` or ``key``). While bars are on
    screen all of them go (the bars and the summary table say it); without bars the
    one ``session_finished`` line per poll stays. Warnings and errors always pass."""
    chatter = method in ("info", "debug", "msg") and any(
        f in event for f in _SESSION_FIELDS
    )
    if chatter and (_live or event.get("event") != "session_finished"):
        raise structlog.DropEvent
    return event


class _TerminalLogger:
    """structlog logger printing each rendered line through :func:`terminal`."""

    def msg(self, message: str) -> None:
        from rich.text import Text

        terminal().print(Text.from_ansi(message), soft_wrap=True, highlight=False)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _TerminalHandler(logging.Handler):
    """stdlib logging handler for the terminal: third-party lines go above the bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _TerminalLogger().msg(self.format(record))
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def configure(
    fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog for the process: console on a terminal, JSON lines otherwise.

    :param fmt: ``console``, ``json`` or ``auto`` (console when ``stream`` is a TTY).
    :param level: ``debug``, ``info``, ``warning``, ``error`` or ``critical``.
    """
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    # The terminal path: stderr itself is a TTY and the console format is wanted.
    global _on_terminal
    on_terminal = _on_terminal = fmt == "console" and stream is None and out.isatty()
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
    ]
    if on_terminal and _LEVELS.get(level, 20) >= _LEVELS["info"]:
        processors.append(_quiet_chatter)
    processors += [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks become text before redaction in both formats: a renderer that formats
    # exc_info itself (rich, with frame locals) would print secrets unredacted.
    processors += [structlog.processors.format_exc_info, redact_secrets, renderer]
    factory: Any = (
        (lambda *_args: _TerminalLogger())
        if on_terminal
        else structlog.PrintLoggerFactory(file=out)
    )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, 20)),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    if on_terminal:
        handler: logging.Handler = _TerminalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.basicConfig(level=_LEVELS.get(level, 20), handlers=[handler])
    else:
        logging.basicConfig(
            level=_LEVELS.get(level, 20), stream=out, format="%(message)s"
        )
    # httpx logs every request URL at INFO; a webhook URL's path or query can be the
    # credential (the forwarder logs a safe form itself).
    logging.getLogger("httpx").setLevel(max(logging.WARNING, _LEVELS.get(level, 20)))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RedactingFilter) for f in handler.filters):
            handler.addFilter(_RedactingFilter())
