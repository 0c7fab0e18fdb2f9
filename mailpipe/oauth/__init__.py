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
from mailpipe.oauth.table import OAuthOptions

if TYPE_CHECKING:
    from mailpipe.oauth.broker import TokenBroker
    from mailpipe.oauth.options import GoogleOAuth, MicrosoftOAuth, OidcOAuth
    from mailpipe.oauth.pool import broker_for

#: Imported on first use (name -> module): a configuration without OAuth never pays
#: at start-up for the broker (token cache, cryptography) nor the provider models
#: (issue 18).
_LAZY = {
    "TokenBroker": "mailpipe.oauth.broker",
    "broker_for": "mailpipe.oauth.pool",
    "GoogleOAuth": "mailpipe.oauth.options",
    "MicrosoftOAuth": "mailpipe.oauth.options",
    "OidcOAuth": "mailpipe.oauth.options",
}


def __getattr__(name: str) -> Any:
    """The names of :data:`_LAZY`, imported on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
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
