"""What a provider flow returns, the contract every flow keeps, and error translation."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from mailpipe.errors import AuthenticationError
from mailpipe.oauth.errors import TokenEndpointBusy, classify

#: Error codes that mean "later", not "never" (RFC 6749 §5.2, RFC 8628 §3.5).
BUSY_CODES: Final = frozenset({"temporarily_unavailable", "slow_down", "server_error"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """A token response: the access token, its lifetime in seconds and, when the
    provider sent one, a (possibly rotated) refresh token."""

    access_token: str = field(repr=False)
    expires_in: float
    refresh_token: str = field(default="", repr=False)
    scope: str = ""


class Flow(Protocol):
    """One provider flow. ``acquire`` blocks (it runs on a worker thread) and raises
    :class:`~mailpipe.errors.AuthenticationError` subclasses or
    :class:`~mailpipe.oauth.errors.TokenEndpointBusy`, never with a secret in the text.
    """

    #: True when ``acquire`` needs a refresh token from ``mailpipe auth login``.
    needs_refresh_token: bool

    def acquire(self, refresh_token: str) -> Grant:
        """Get a fresh access token (``refresh_token`` is "" for app-only flows)."""
        ...


def error_from(
    code: str, description: str, *, where: str, retry_after: float | None = None
) -> AuthenticationError | TokenEndpointBusy:
    """The exception for an OAuth error response from ``where``."""
    if code in BUSY_CODES:
        return TokenEndpointBusy(
            f"{where}: token endpoint busy ({code})", code=code, retry_after=retry_after
        )
    return classify(code, description, where=where)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3: a number of
    seconds or an HTTP-date), or None when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RetryAfterWatch:
    """Remembers the ``Retry-After`` of the last response a ``requests`` session got
    (a response hook), for libraries that raise without the response's headers."""

    def __init__(self, session: Any) -> None:
        self.value: float | None = None
        session.hooks["response"].append(self._seen)

    def _seen(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        self.value = parse_retry_after(response.headers.get("Retry-After"))
        return response


def trust(session: Any, ca_file: Path | None) -> Any:
    """Make ``session`` (a ``requests.Session``) verify against ``ca_file`` when set.

    requests lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` override a session's
    ``verify``; a configured ``ca_file`` must win, so the merge keeps it.
    """
    if ca_file is None:
        return session
    session.verify = str(ca_file)
    merge = session.merge_environment_settings

    def keep_ca(*args: Any, **kwargs: Any) -> Any:
        settings = merge(*args, **kwargs)
        settings["verify"] = str(ca_file)
        return settings

    session.merge_environment_settings = keep_ca
    return session


@contextmanager
def transport_errors(where: str) -> Iterator[None]:
    """Turn connection, TLS and timeout failures of ``requests`` into
    TokenEndpointBusy (the class name only: URLs may carry a secret)."""
    import requests

    try:
        yield
    except requests.RequestException as exc:
        raise TokenEndpointBusy(
            f"{where}: token endpoint unreachable ({type(exc).__name__})",
            code="unreachable",
        ) from None
