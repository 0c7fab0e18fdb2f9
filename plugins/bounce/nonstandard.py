"""Bounces without a delivery-status part (qmail, Exim, old Sendmail, Gmail and
Exchange notices, ...): recognised by sender and subject, recipients from
``flufl.bounce``'s detectors when it is installed (``mailpipe[bounce]``)."""

from __future__ import annotations

import email
import email.policy
import logging
import re
from collections.abc import Callable
from typing import Final

from mailpipe.plugins.parse.desk import Bounce, BounceRecipient
from mailpipe.plugins.parse.record import MessageRecord

from .dsn import make_bounce

_DAEMONS: Final = frozenset(
    {"mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon", "maildaemon"}
)
_SUBJECT: Final = re.compile(
    r"undeliver|returned mail|delivery (status notification \(failure|failure|has "
    r"failed|failed)|mail delivery (failed|failure|subsystem)|failure notice"
    r"|non[- ]?delivery|unzustellbar|nicht zustellbar|non remis|non distribu"
    r"|no se (puede|pudo) entregar|não (foi possível )?entreg|onbestelbaar"
    r"|配信不能|配送エラー|退信|投递失败|無法傳遞",
    re.I,
)
#: Octets of a message given to flufl.bounce: its detectors cost time per line
#: (a report padded with blank lines took about a minute at 800 KB), and what a
#: notice says of its failed recipients comes first.
FLUFL_MAX: Final = 64 * 1024
_STATUS: Final = re.compile(r"(?<![\d.])([45]\.\d{1,3}\.\d{1,3})(?![\d.])")
_SMTP_CODE: Final = re.compile(r"(?<!\d)([45]\d\d)[ -]")


def looks_like_bounce(record: MessageRecord) -> bool:
    """True for a message from a mailer daemon, or with a bounce subject and no
    ordinary sender (RFC 3464 §2: bounces go to the null reverse-path)."""
    senders = [a.address.partition("@")[0].casefold() for a in record.from_addresses]
    if any(s in _DAEMONS for s in senders):
        return True
    return bool(_SUBJECT.search(record.subject or "")) and (
        not senders or any(s.startswith(("mailer", "postmaster", "bounce")) for s in senders)
        or any(v.strip() == "<>" for k, v in record.headers if k.lower() == "return-path")
    )


def flufl_failures(raw: bytes) -> tuple[set[str], set[str]] | None:
    """(temporary, permanent) failed addresses by ``flufl.bounce``; None when it is
    not installed. Its detectors' exceptions and log output are contained."""
    try:
        from flufl.bounce import all_failures
    except ImportError:
        return None
    logger = logging.getLogger("flufl.bounce")
    level, logger.level = logger.level, logging.CRITICAL + 1  # it logs tracebacks
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        temporary, permanent = all_failures(msg)
    except Exception:
        return set(), set()
    finally:
        logger.setLevel(level)
    return {_text(a) for a in temporary}, {_text(a) for a in permanent}


def _text(address: object) -> str:
    if isinstance(address, bytes):
        return address.decode("utf-8", "replace")
    return str(address)


def parse_nonstandard(
    record: MessageRecord, raw: Callable[[], bytes | None]
) -> Bounce | None:
    """The bounce of a message :func:`looks_like_bounce` accepted; None otherwise.
    ``raw()`` gives the message bytes for flufl.bounce, at most :data:`FLUFL_MAX`
    (the head of a larger message; None: none to give)."""
    if not looks_like_bounce(record):
        return None
    text = record.text or ""
    status = _STATUS.search(text)
    code = _SMTP_CODE.search(text)
    permanent_hint = (status.group(1) if status else code.group(1) if code else "")[:1]
    data = raw()
    found = flufl_failures(data) if data is not None else None
    temporary, permanent = found if found is not None else (set(), set())
    recipients = [
        BounceRecipient(
            address=a, action="delayed", status=status.group(1) if status else None
        )
        for a in sorted(temporary - permanent)
    ] + [
        BounceRecipient(
            address=a, action="failed", status=status.group(1) if status else None
        )
        for a in sorted(permanent)
    ]
    bounce = make_bounce("non-standard", recipients)
    if not recipients:
        bounce.permanent = permanent_hint == "5"
        bounce.action = "failed" if bounce.permanent else "unknown"
    return bounce
