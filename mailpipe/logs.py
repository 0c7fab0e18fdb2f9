"""structlog configuration, applied once by the CLI; includes secret redaction."""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

from mailpipe.secrets import redact

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
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks become text before redaction in both formats: a renderer that formats
    # exc_info itself (rich, with frame locals) would print secrets unredacted.
    processors += [structlog.processors.format_exc_info, redact_secrets, renderer]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, 20)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=_LEVELS.get(level, 20), stream=out, format="%(message)s")
    # httpx logs every request URL at INFO; a webhook URL's path or query can be the
    # credential (the forwarder logs a safe form itself).
    logging.getLogger("httpx").setLevel(max(logging.WARNING, _LEVELS.get(level, 20)))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RedactingFilter) for f in handler.filters):
            handler.addFilter(_RedactingFilter())
