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

from mailpipe.oauth.broker import TokenBroker
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
from mailpipe.oauth.pool import broker_for

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
