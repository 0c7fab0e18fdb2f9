"""Default scopes per provider, flow and mail protocol (each overridable with ``scopes``).

Microsoft: delegated flows ask for the Exchange Online permission of the protocol plus
``offline_access`` (a refresh token); app-only (client credentials) asks for the
resource's ``.default`` scope, which carries the ``POP.AccessAsApp`` /
``IMAP.AccessAsApp`` application permissions granted to the app. Google: one scope,
``https://mail.google.com/``, covers POP3 and IMAP. Generic OIDC providers have no
standard mail scope: ``openid`` plus ``offline_access`` for refresh tokens.
"""

from __future__ import annotations

from typing import Final, Literal

Protocol = Literal["pop3", "imap"]

_OUTLOOK: Final = "https://outlook.office.com"
MICROSOFT_DELEGATED: Final[dict[str, tuple[str, ...]]] = {
    "pop3": (f"{_OUTLOOK}/POP.AccessAsUser.All", "offline_access"),
    "imap": (f"{_OUTLOOK}/IMAP.AccessAsUser.All", "offline_access"),
}
#: App-only tokens: the application permissions POP.AccessAsApp / IMAP.AccessAsApp
#: are carried by the resource's ``.default`` scope.
MICROSOFT_APP: Final = (f"{_OUTLOOK}/.default",)
GOOGLE_MAIL: Final = ("https://mail.google.com/",)
OIDC_DEFAULT: Final = ("openid", "offline_access")


def default_scopes(provider: str, flow: str, protocol: Protocol) -> tuple[str, ...]:
    """The scopes asked for when the ``oauth`` table names none."""
    if provider == "microsoft":
        if flow == "client_credentials":
            return MICROSOFT_APP
        return MICROSOFT_DELEGATED[protocol]
    if provider == "google":
        return GOOGLE_MAIL
    if flow == "client_credentials":
        return ()
    return OIDC_DEFAULT
