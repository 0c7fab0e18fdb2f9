"""The token broker: a valid access token for a mailbox, refreshed rarely and once.

Theory of operation
-------------------
``token()`` reads the account's cache row. A token before its ``refresh_at`` is
returned as is: no request at all, so polls never refresh by themselves. Past
``refresh_at`` (``expires_at`` minus ``refresh_margin`` minus a random part of
``refresh_jitter``, fixed when the token is stored so every worker agrees), the worker
that wins the refresh lease asks the provider; the others keep using the current token
while it is still valid, or wait (bounded) for the winner's result. A refresh token
that the provider called revoked is not offered again: ``GrantRevoked`` is raised from
the cache until ``mailpipe auth login`` stores a new one, so a dead grant never turns
into a request per poll.

Every failure is one log line ``oauth_refresh_failed`` with the provider's error code,
a count in :mod:`mailpipe.oauth.gauges`, and the row's ``last_error``.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import time
from collections.abc import Callable
from typing import Final

import structlog

from mailpipe.errors import AuthenticationError
from mailpipe.oauth import gauges
from mailpipe.oauth.cache import CachedToken, TokenCache
from mailpipe.oauth.errors import (
    REVOKED_CODES,
    GrantRevoked,
    NoRefreshToken,
    TokenEndpointBusy,
)
from mailpipe.oauth.grant import Flow, Grant
from mailpipe.oauth.options import AnyOAuth, GoogleOAuth, MicrosoftOAuth, OidcOAuth
from mailpipe.oauth.scopes import Protocol
from mailpipe.oauth.sealing import SealError

log = structlog.get_logger()

#: Waits for another worker's refresh before giving up for this poll (bounded loop).
LEASE_WAITS: Final = 40
LEASE_POLL: Final = 0.25  # seconds between two looks at the row while waiting
#: A token a mail server refuses within this many seconds of its issue is refreshed
#: only when the refusal says the token is invalid or expired: otherwise the refusal
#: is the mailbox's (wrong user, no licence), and an app-only token shared by every
#: mailbox of the app must not be refreshed for it at each poll.
REFUSAL_GRACE: Final = 300.0
# XOAUTH2/OAUTHBEARER error statuses (RFC 7628 §3.2.2, Google's "401") and words.
_TOKEN_REFUSAL: Final = re.compile(
    r"invalid[_ ]token|expired|status=401\b|status=invalid_token", re.IGNORECASE
)


def make_flow(options: AnyOAuth, protocol: Protocol, *, username: str) -> Flow:
    """The provider flow for ``options``."""
    if isinstance(options, MicrosoftOAuth):
        from mailpipe.oauth.microsoft import MicrosoftFlow

        return MicrosoftFlow(options, protocol)
    if isinstance(options, GoogleOAuth):
        from mailpipe.oauth.google import GoogleFlow

        return GoogleFlow(options, protocol, username=username)
    assert isinstance(options, OidcOAuth)
    from mailpipe.oauth.oidc import OidcFlow

    return OidcFlow(options, protocol)


def _still_valid(entry: CachedToken | None, now: float) -> bool:
    """True when ``entry`` holds an access token that has not expired at ``now``."""
    return bool(
        entry is not None
        and entry.access_token
        and entry.expires_at is not None
        and now < entry.expires_at
    )


class TokenBroker:
    """Access tokens for one mailbox from the shared cache (see the module docstring).

    ``owner`` names this worker in the lease; ``clock`` returns Unix time and ``rng``
    a float in [0, 1) (tests fix both); ``flow`` replaces the provider flow (tests).
    """

    def __init__(
        self,
        options: AnyOAuth,
        *,
        protocol: Protocol,
        username: str,
        cache: TokenCache,
        mailbox: str = "",
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        flow: Flow | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.options = options
        self.protocol = protocol
        self.username = username
        self.cache = cache
        self.mailbox = mailbox or username
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.clock = clock
        self.rng = rng
        self.flow = flow or make_flow(options, protocol, username=username)
        self.account = options.account_key(protocol, username)
        self._sleep = sleep
        self._log = log.bind(
            mailbox=self.mailbox, provider=options.provider, flow=options.flow
        )

    async def token(self) -> str:
        """A valid access token (see :meth:`token_sync`), off the event loop."""
        return await asyncio.to_thread(self.token_sync)

    def token_sync(self) -> str:
        """A valid access token, from the cache or freshly refreshed.

        :raises GrantRevoked: the refresh token or consent is gone.
        :raises NoRefreshToken: a delegated flow before ``mailpipe auth login``.
        :raises ClientRejected: the provider refused the client itself.
        :raises TokenEndpointBusy: the endpoint (or the lease holder) did not answer
            and the current token has expired (before expiry it is returned, the
            failure logged and counted, and the next poll tries again).
        """
        for _ in range(LEASE_WAITS):
            entry = self._load()
            now = self.clock()
            if entry is not None and entry.access_token and (
                entry.refresh_at is not None and now < entry.refresh_at
            ):
                self._observed(entry, refreshed=False)
                return entry.access_token
            self._refuse_dead_grant(entry)
            if self.cache.take_lease(
                self.account, owner=self.owner, ttl=self.options.timeout * 3 + 10
            ):
                try:
                    return self._refresh(self._load())
                finally:
                    self.cache.release_lease(self.account, owner=self.owner)
            if _still_valid(entry, now):
                assert entry is not None
                return entry.access_token  # being refreshed elsewhere; still valid
            self._sleep(LEASE_POLL)
        raise TokenEndpointBusy(
            f"oauth {self.options.provider}: another worker's token refresh did not "
            "finish in time",
            code="lease_busy",
        )

    def _load(self) -> CachedToken | None:
        try:
            return self.cache.load(self.account)
        except SealError as exc:
            # Another cache_key sealed the entry: like a dead grant, only a new login
            # (or the right key) helps, so /healthz reports it until a token is issued.
            gauges.refresh_failed(
                self.mailbox, reason="cache_key_mismatch", revoked=True, asked=False
            )
            self._log.error("oauth_cache_unreadable", error=str(exc))
            raise

    def invalidate(self, access_token: str) -> None:
        """The server refused ``access_token``: refresh before it is used again."""
        self.cache.expire(self.account, access_token)

    def refused(self, access_token: str, reason: str) -> bool:
        """A mail server refused ``access_token`` with ``reason`` (its error text).

        True when a new token is worth one more attempt: the token was invalidated
        (the refusal says it is invalid or expired, or it is older than
        :data:`REFUSAL_GRACE`), or another worker already replaced it. False when a
        fresh token was refused for another reason: it is kept, and the login fails.
        """
        entry = self.cache.load(self.account)
        if entry is None or entry.access_token != access_token:
            return True
        about_token = _TOKEN_REFUSAL.search(reason) is not None
        age = self.clock() - (entry.last_refresh or 0.0)
        if not about_token and age < REFUSAL_GRACE:
            self._log.info("oauth_token_kept", reason="refusal_not_about_token")
            return False
        self.invalidate(access_token)
        return True

    def _refuse_dead_grant(self, entry: CachedToken | None) -> None:
        if entry is None or not self.flow.needs_refresh_token:
            return
        if entry.last_error_code in REVOKED_CODES and (
            entry.last_error_at or 0.0
        ) >= (entry.rt_issued_at or 0.0):
            gauges.refresh_failed(
                self.mailbox, reason=entry.last_error_code, revoked=True, asked=False
            )
            raise GrantRevoked(
                f"oauth {self.options.provider}: the grant was refused "
                f"({entry.last_error_code}); run `mailpipe auth login`",
                code=entry.last_error_code,
            )

    def _refresh(self, entry: CachedToken | None) -> str:
        if (
            entry is not None
            and entry.access_token
            and entry.refresh_at is not None
            and self.clock() < entry.refresh_at
        ):
            return entry.access_token  # the previous lease holder just refreshed
        refresh_token = entry.refresh_token if entry is not None else ""
        try:
            if self.flow.needs_refresh_token and not refresh_token:
                raise NoRefreshToken(
                    f"oauth {self.options.provider}: no refresh token yet; run "
                    "`mailpipe auth login CONFIG MAILBOX`"
                )
            grant = self.flow.acquire(refresh_token)
        except (AuthenticationError, TokenEndpointBusy) as exc:
            code = str(getattr(exc, "code", "") or type(exc).__name__)
            self.cache.record_error(
                self.account, code=code, message=str(exc),
                rt_issued_at=entry.rt_issued_at if entry is not None else None,
            )
            revoked = isinstance(exc, GrantRevoked | NoRefreshToken)
            gauges.refresh_failed(self.mailbox, reason=code, revoked=revoked)
            if isinstance(exc, TokenEndpointBusy) and _still_valid(entry, self.clock()):
                # An early refresh that failed for now: the current token still
                # works, so the poll goes on with it and the next poll tries again.
                assert entry is not None
                self._log.warning(
                    "oauth_refresh_failed", code=code, error=str(exc),
                    kept_valid_token=True, expires_at=entry.expires_at,
                )
                return entry.access_token
            self._log.error("oauth_refresh_failed", code=code, error=str(exc))
            raise
        return self.save(grant, previous=entry)

    def save(self, grant: Grant, *, previous: CachedToken | None) -> str:
        """Store ``grant`` (also used by ``mailpipe auth login``); return its token."""
        now = self.clock()
        lifetime = max(0.0, grant.expires_in)
        expires_at = now + lifetime
        early = self.options.refresh_margin + self.rng() * self.options.refresh_jitter
        # A token shorter-lived than the margin is refreshed half-way through.
        refresh_at = expires_at - early if early < lifetime else now + lifetime / 2
        rotated = bool(grant.refresh_token)
        refresh_token = grant.refresh_token or (
            previous.refresh_token if previous is not None else ""
        )
        rt_issued_at = now if rotated else (
            previous.rt_issued_at if previous is not None else None
        )
        self.cache.store(
            self.account,
            access_token=grant.access_token,
            refresh_token=refresh_token,
            expires_at=expires_at,
            refresh_at=refresh_at,
            rt_issued_at=rt_issued_at if refresh_token else None,
        )
        stored = self.cache.load(self.account)
        assert stored is not None
        self._observed(stored, refreshed=True)
        self._log.info(
            "oauth_token_refreshed", expires_in=round(lifetime), rotated=rotated
        )
        return grant.access_token

    def _observed(self, entry: CachedToken, *, refreshed: bool) -> None:
        risk = None
        if entry.rt_issued_at is not None:
            risk = entry.rt_issued_at + self.options.refresh_token_max_age
        gauges.token_issued(
            self.mailbox,
            expires_at=entry.expires_at or 0.0,
            rt_at_risk=risk,
            refreshed=refreshed,
        )
