"""How a token request failed, classified for the scheduler's back-off.

``GrantRevoked`` (the refresh token or consent is gone: only a new ``mailpipe auth
login`` helps) and ``ClientRejected`` (wrong client, secret, scope) are
:class:`~mailpipe.errors.AuthenticationError`: the mailbox backs off long and is
reported unhealthy. ``TokenEndpointBusy`` (429, 5xx, timeouts, a refresh held by another
worker for too long) is a :class:`~mailpipe.errors.SourceBusyError`: retried sooner.
Messages carry the provider's error code, never a token or secret.
"""

from __future__ import annotations

from typing import Final

from mailpipe.errors import AuthenticationError, SourceBusyError

#: OAuth error codes (RFC 6749 §5.2) and provider codes meaning the grant is gone.
REVOKED_CODES: Final = frozenset(
    {"invalid_grant", "consent_required", "interaction_required", "expired_token"}
)
#: Errors of the client's own setup.
CLIENT_CODES: Final = frozenset(
    {"invalid_client", "unauthorized_client", "invalid_scope", "invalid_request",
     "unsupported_grant_type", "access_denied"}
)


class GrantRevoked(AuthenticationError):
    """The refresh token or consent is no longer valid; run ``mailpipe auth login``."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class ClientRejected(AuthenticationError):
    """The provider refused the client (id, secret, certificate, scope)."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class TokenEndpointBusy(SourceBusyError):
    """The token endpoint could not answer now (429, 5xx, timeout); retried later."""


class NoRefreshToken(AuthenticationError):
    """A delegated flow has no refresh token yet: run ``mailpipe auth login``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = "no_refresh_token"


def classify(code: str, description: str, *, where: str) -> AuthenticationError:
    """The error for an OAuth error response (``code`` per RFC 6749 §5.2).

    Only the first line of the provider's description is kept (Microsoft's carries
    trace ids over several lines); it never holds a credential.
    """
    first = description.strip().splitlines()[0][:300] if description.strip() else ""
    detail = f": {first}" if first else ""
    if code in REVOKED_CODES or "AADSTS50173" in description or (
        "AADSTS700082" in description
    ):
        return GrantRevoked(
            f"{where}: the grant was refused ({code}){detail}; run "
            "`mailpipe auth login`",
            code=code,
        )
    return ClientRejected(f"{where}: token request refused ({code}){detail}", code=code)
