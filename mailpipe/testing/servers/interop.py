"""Helpers of the interop suite: corpus samples, mailpipe runs, what each server changes.

The suite (``tests/e2e/test_interop_*.py``) checks that mailpipe stores exactly the
octets a server serves (read independently with
:class:`~.refclient.ReferenceClient`). How a server's served form differs from the
message it was given is that server's business, recorded here per server by
:func:`served_as_given` so that a change in a server (or in the loaders) shows up.
"""

from __future__ import annotations

import email
import email.policy
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailpipe.testing.e2e import log_events, run_mailpipe, write_pipeline

from .base import LabServer

__all__ = [
    "canonical",
    "has_8bit_headers",
    "lab_pipeline",
    "mailpipe_once",
    "sample",
    "served_as_given",
    "stored_messages",
]


def canonical(raw: bytes) -> bytes:
    """``raw`` with CRLF as LF and a final LF: equal for a message and its POP3 form
    (a server must end every message with a line break before the terminator)."""
    data = raw.replace(b"\r\n", b"\n")
    return data if data.endswith(b"\n") else data + b"\n"


def _head(raw: bytes) -> bytes:
    data = raw.replace(b"\r\n", b"\n")
    return data.split(b"\n\n", 1)[0]


def has_8bit_headers(raw: bytes, *, parts: bool = False) -> bool:
    """True when the header section holds an octet above 127 (RFC 6532 / 6856);
    with ``parts``, the header of any MIME part counts too (as Courier judges)."""
    if any(b > 127 for b in _head(raw)):
        return True
    if not parts:
        return False
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    return any(
        any("\udc80" <= c <= "\udcff" for c in str(value))
        for part in message.walk()
        for _, value in part.raw_items()
    )


_CYRUS_TRACE = re.compile(
    rb"\AReceived: from [^\n]*\n(?:[ \t][^\n]*\n)*"
    rb"X-Cyrus-Session-Id: [^\n]*\n"
    rb"X-Sieve: [^\n]*\n"
)
_RETURN_PATH = re.compile(rb"^Return-Path:[^\n]*\n", re.MULTILINE | re.IGNORECASE)
_CYRUS_MESSAGE_ID = re.compile(rb"^Message-ID: <cmu-lmtpd-[^>]*>\n", re.MULTILINE)
_DATE = re.compile(rb"^Date:[^\n]*\n", re.MULTILINE | re.IGNORECASE)


def _cyrus_unwrapped(served: bytes, given: bytes) -> bytes:
    # Cyrus replaces Return-Path, puts its Received/X-Cyrus-Session-Id/X-Sieve on
    # top and adds Message-ID and Date when the message has none.
    head, sep, body = served.partition(b"\n\n")
    head = _CYRUS_TRACE.sub(b"", _RETURN_PATH.sub(b"", head + b"\n"), count=1)
    head = _CYRUS_MESSAGE_ID.sub(b"", head)
    if not _DATE.search(_head(given) + b"\n"):
        head = _DATE.sub(b"", head, count=1)
    return head[:-1] + sep + body


def served_as_given(server: str, given: bytes, served: bytes) -> bool:
    """True when ``served`` is ``given`` up to what ``server`` is known to add.

    dovecot, courier, solid: identical (CRLF ~ LF). cyrus: its LMTP adds
    Return-Path, Received, X-Cyrus-Session-Id and X-Sieve on top and fills in a
    missing Message-ID and Date. gnu and popa3d serve mbox files, which do not keep
    every message as given (``From `` quoting, GNU's X-UIDL/X-UID/Status stamps), so
    for them only the byte-exact comparison with the served form counts (False here
    means "not comparable", see the suite's per-server expectations).
    """
    want, got = canonical(given), canonical(served)
    if server in ("dovecot", "courier", "solid"):
        return want == got
    if server == "cyrus":
        head, sep, body = want.partition(b"\n\n")
        want = _RETURN_PATH.sub(b"", head + b"\n")[:-1] + sep + body
        return _cyrus_unwrapped(got, given) == want
    return False


def sample(items: Sequence[tuple[str, bytes]], count: int) -> list[tuple[str, bytes]]:
    """``count`` items spread evenly over ``items`` (deterministic), order kept."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def stored_messages(maildir: Path) -> list[bytes]:
    """Contents of every file ``store.maildir`` wrote under ``maildir`` (new/, cur/)."""
    return [
        p.read_bytes()
        for sub in ("new", "cur")
        if (maildir / sub).is_dir()
        for p in sorted((maildir / sub).iterdir())
        if p.is_file()
    ]


def mailpipe_once(
    config: Path, *, timeout: float = 300.0
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``mailpipe run --once`` on ``config``: the process and its last
    ``session_finished`` summary (``{}`` when there was none)."""
    run = run_mailpipe(config, "run", "{config}", "--once", timeout=timeout)
    finished = [
        e for e in log_events(run.stderr) if e.get("event") == "session_finished"
    ]
    return run, (finished[-1] if finished else {})


def lab_pipeline(
    directory: Path,
    lab: LabServer,
    *steps: dict[str, Any],
    security: str | None = None,
    host: str | None = None,
    port: int | None = None,
    **mailbox: Any,
) -> Path:
    """``directory/pipeline.toml`` polling ``lab``'s user: ``steps`` then
    ``store.maildir`` into ``directory/Maildir``; ``mailbox`` adds keys to the
    mailbox table. ``security`` defaults to implicit TLS where the server has it."""
    if security is None:
        security = "tls" if lab.implicit_tls else "none"
    return write_pipeline(
        directory,
        dovecot=lab,
        user=lab.user,
        security=security,  # type: ignore[arg-type]
        host=host,
        port=port,
        processors=[
            *steps,
            {"use": "store.maildir", "path": str(directory / "Maildir")},
        ],
        mailbox={"read_timeout": 60, **mailbox},
    )
