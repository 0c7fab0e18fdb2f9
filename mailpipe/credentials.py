"""The secrets a mail source logs in with, shared by the POP3 and IMAP sources.

A mailbox names a ``password``, and for XOAUTH2/OAUTHBEARER either an ``oauth`` table
(tokens from :mod:`mailpipe.oauth`'s broker and its cache in the journal) or a static
``oauth_token`` secret. :class:`Credentials` reads them once per session;
:meth:`Credentials.login` presents an OAuth token and, when the server refuses a
broker's token before its expiry (clock skew, a revoked access token), invalidates it,
asks the broker once more and authenticates again (C-42: never a password instead).
The two validators keep the options' cross-field rules in one place; their errors
name the key and never echo the table (which may hold the password).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from pydantic import ValidationInfo

from mailpipe import sasl
from mailpipe.errors import AuthenticationError
from mailpipe.secrets import Secret

if TYPE_CHECKING:
    from mailpipe.oauth.broker import TokenBroker
    from mailpipe.oauth.options import AnyOAuth
    from mailpipe.oauth.scopes import Protocol as MailProtocol

#: The ``auth`` values that present an OAuth token.
OAUTH: Final = frozenset({"xoauth2", "oauthbearer"})

__all__ = [
    "OAUTH",
    "Credentials",
    "LoginOptions",
    "check_auth_has_credentials",
    "check_token_when_needed",
]


class LoginOptions(Protocol):
    """The keys of a source's options that :class:`Credentials` reads."""

    @property
    def username(self) -> str: ...
    @property
    def password(self) -> Secret | None: ...
    @property
    def oauth(self) -> AnyOAuth | None: ...
    @property
    def oauth_token(self) -> Secret | None: ...


def _unset(info: ValidationInfo, key: str) -> bool:
    """True when ``key`` validated to None (not when it failed validation)."""
    return key in info.data and info.data[key] is None


def check_auth_has_credentials(auth: str, info: ValidationInfo) -> str:
    """The ``auth`` validator: a password method needs ``password``.

    A password that failed its own validation is absent from ``info.data`` and is not
    reported twice.
    """
    if auth not in OAUTH and auth != "auto" and _unset(info, "password"):
        raise ValueError(f"auth = {auth!r} needs password")
    return auth


def check_token_when_needed(token: Secret | None, info: ValidationInfo) -> Secret | None:
    """The ``oauth_token`` validator (declared after ``password``, ``auth``, ``oauth``).

    ``oauth`` and ``oauth_token`` exclude each other; an OAuth ``auth`` needs one of
    them; with neither, a ``password`` is required.
    """
    if token is not None and info.data.get("oauth") is not None:
        raise ValueError("set oauth or oauth_token, not both")
    if token is None and "oauth" in info.data and info.data["oauth"] is None:
        if info.data.get("auth") in OAUTH:
            raise ValueError(
                f"auth = {info.data['auth']!r} needs oauth_token or an oauth table"
            )
        if _unset(info, "password"):
            raise ValueError("set password or oauth_token (or an oauth table)")
    return token


@dataclass(slots=True)
class Credentials:
    """One session's secrets; ``repr`` shows neither the password nor the token."""

    password: str = dataclasses.field(repr=False)
    token: str = dataclasses.field(repr=False)
    broker: TokenBroker | None = None

    @classmethod
    async def load(
        cls, options: LoginOptions, *, protocol: MailProtocol, mailbox: str
    ) -> Credentials:
        """Read the password and a current token (the broker's, else the static one).

        Raises:
            AuthenticationError: the broker has no usable grant (e.g. ``GrantRevoked``).
        """
        broker = None
        if options.oauth is not None:
            from mailpipe.oauth.pool import broker_for

            broker = broker_for(
                options.oauth, protocol=protocol, username=options.username,
                mailbox=mailbox,
            )
            token = await broker.token()
        elif options.oauth_token is not None:
            token = await options.oauth_token.refresh_async()
        else:
            token = ""
        password = options.password.get() if options.password is not None else ""
        return cls(password=password, token=token, broker=broker)

    def oauth_mechanism(
        self, method: str, *, user: str, host: str, port: int
    ) -> sasl.XOAuth2 | sasl.OAuthBearer:
        """The SASL mechanism for ``method`` (``xoauth2`` or ``oauthbearer``)."""
        if method == "xoauth2":
            return sasl.XOAuth2(user=user, token=self.token)
        return sasl.OAuthBearer(user=user, token=self.token, host=host, port=port)

    async def login(
        self,
        method: str,
        mechanism: sasl.Mechanism,
        authenticate: Callable[[sasl.Mechanism], Awaitable[None]],
    ) -> None:
        """``authenticate(mechanism)``; a broker's token the server refuses is
        refreshed once and presented again when the broker says a new token is worth
        it (:meth:`TokenBroker.refused`: the refusal is about the token, the token is
        old, or another worker replaced it); a second refusal propagates.

        Raises:
            AuthenticationError: the server refused the credentials.
        """
        try:
            await authenticate(mechanism)
        except AuthenticationError as exc:
            if self.broker is None or method not in OAUTH:
                raise
            assert isinstance(mechanism, sasl.XOAuth2 | sasl.OAuthBearer)
            # The refusal may be this mailbox's, not the (possibly shared) token's.
            if not await asyncio.to_thread(self.broker.refused, self.token, str(exc)):
                raise
            self.token = await self.broker.token()
            await authenticate(dataclasses.replace(mechanism, token=self.token))
