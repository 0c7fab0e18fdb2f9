"""OAuth 2.0 built in: provider flows, a shared encrypted token cache and the broker.

A mailbox's ``oauth = { provider = "microsoft" | "google" | "oidc", ... }`` table
(:mod:`mailpipe.oauth.options`) selects a flow (:mod:`~mailpipe.oauth.microsoft`,
:mod:`~mailpipe.oauth.google`, :mod:`~mailpipe.oauth.oidc`); the
:class:`~mailpipe.oauth.broker.TokenBroker` hands out access tokens from the cache in
the journal's database (:mod:`mailpipe.oauth.cache`) and refreshes them, once across
workers, before they expire. ``mailpipe auth`` (:mod:`mailpipe.oauth.cli`) logs in,
shows and revokes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailpipe.oauth.errors import (
    ClientRejected,
    GrantRevoked,
    NoRefreshToken,
    TokenEndpointBusy,
)
from mailpipe.oauth.options import (
    GoogleOAuth,
    MicrosoftOAuth,
    OAuthOptions,
    OidcOAuth,
)

if TYPE_CHECKING:
    from mailpipe.oauth.broker import TokenBroker
    from mailpipe.oauth.pool import broker_for


def __getattr__(name: str) -> Any:
    """The broker (token cache, cryptography) is imported on first use: a
    configuration without OAuth never pays for it at start-up (issue 18)."""
    if name == "TokenBroker":
        from mailpipe.oauth.broker import TokenBroker

        return TokenBroker
    if name == "broker_for":
        from mailpipe.oauth.pool import broker_for

        return broker_for
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ClientRejected",
    "GoogleOAuth",
    "GrantRevoked",
    "MicrosoftOAuth",
    "NoRefreshToken",
    "OAuthOptions",
    "OidcOAuth",
    "TokenBroker",
    "TokenEndpointBusy",
    "broker_for",
]
