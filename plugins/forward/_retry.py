"""Bounded exponential back-off and TLS contexts shared by the forwarders."""

from __future__ import annotations

import email.utils
import random
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_RETRY_AFTER = 300.0
"""Upper bound on a server-suggested ``Retry-After`` delay honoured within one call."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between attempts: ``base * 2**n`` capped at ``cap``, with optional jitter.

    ``retries`` is the number of attempts after the first, so at most ``retries + 1``
    attempts are made and ``retries`` sleeps happen; the loop is always bounded.
    """

    retries: int
    base: float
    cap: float
    jitter: bool = True

    def delays(self) -> Iterator[float]:
        """Yield the delay before each retry (``retries`` values)."""
        for attempt in range(self.retries):
            delay = min(self.cap, self.base * (2**attempt))
            # "Equal jitter": keep at least half the delay so retries stay spaced out.
            yield delay / 2 + random.uniform(0, delay / 2) if self.jitter else delay


def retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse an HTTP ``Retry-After`` value (RFC 9110 §10.2.3: seconds or an HTTP-date).

    Returns seconds (never negative, at most :data:`MAX_RETRY_AFTER`) or None.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, min(MAX_RETRY_AFTER, seconds))


def client_tls_context(ca_file: Path | None, *, verify: bool) -> ssl.SSLContext:
    """A client context that verifies the peer (system CAs, or ``ca_file`` when given).

    ``verify=False`` is the explicit ``tls_verify = false`` opt-out; never implied.
    """
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def cert_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind ``exc`` (walking causes), or None."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
