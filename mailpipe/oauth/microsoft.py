"""Microsoft identity platform flows through ``msal``.

App-only: client credentials with a secret or a certificate (the ``.default`` scope of
Exchange Online carries ``POP.AccessAsApp`` / ``IMAP.AccessAsApp``). Delegated: a public
client whose refresh token ``mailpipe auth login`` obtained by device code; it is
redeemed without any client secret (AADSTS700025 otherwise).
"""

from __future__ import annotations

from typing import Any, Final

from mailpipe.errors import MailpipeError
from mailpipe.oauth.errors import ClientRejected
from mailpipe.oauth.grant import (
    Grant,
    RetryAfterWatch,
    error_from,
    transport_errors,
    trust,
)
from mailpipe.oauth.options import MICROSOFT_AUTHORITY, MicrosoftOAuth
from mailpipe.oauth.scopes import Protocol

#: msal adds these itself and refuses them in ``scopes``.
_RESERVED: Final = frozenset({"openid", "profile", "offline_access"})


class MicrosoftFlow:
    """:class:`~mailpipe.oauth.grant.Flow` for ``provider = "microsoft"``."""

    def __init__(self, options: MicrosoftOAuth, protocol: Protocol) -> None:
        self.options = options
        self.scopes = [
            s for s in options.effective_scopes(protocol) if s not in _RESERVED
        ]
        self.needs_refresh_token = options.flow == "device_code"
        self.where = f"microsoft {options.authority_url()}"
        self._retry_after: RetryAfterWatch | None = None  # of the last app's session

    def _app_kwargs(self) -> dict[str, Any]:
        import functools

        import msal
        import requests

        o = self.options
        custom = not o.authority_url().startswith(MICROSOFT_AUTHORITY)
        session = trust(requests.Session(), o.ca_file)
        session.request = functools.partial(session.request, timeout=o.timeout)
        self._retry_after = RetryAfterWatch(session)
        return {
            "http_client": session,
            "authority": o.authority_url(),
            # A private authority (tests, sovereign clouds) is not known to
            # Microsoft's instance discovery: skip it, keep tenant discovery.
            "validate_authority": not custom,
            "instance_discovery": False if custom else None,
            "token_cache": msal.TokenCache(),  # the broker decides when to refresh
        }

    def _credential(self) -> Any:
        o = self.options
        if o.client_secret is not None:
            return o.client_secret.get()
        assert o.certificate is not None
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        pem = o.certificate.read_bytes()
        thumbprint = o.certificate_thumbprint
        if thumbprint is None:
            cert = x509.load_pem_x509_certificate(pem)
            thumbprint = cert.fingerprint(hashes.SHA1()).hex()  # noqa: S303 (Azure's id)
        return {"private_key": pem.decode(), "thumbprint": thumbprint}

    def public_app(self) -> Any:
        """A msal public client (device code login and delegated refresh)."""
        import msal

        with transport_errors(self.where):
            return msal.PublicClientApplication(
                self.options.client_id, **self._app_kwargs()
            )

    def acquire(self, refresh_token: str) -> Grant:
        """Client credentials, or redeem the delegated refresh token."""
        import msal

        o = self.options
        try:
            with transport_errors(self.where):
                if o.flow == "client_credentials":
                    app = msal.ConfidentialClientApplication(
                        o.client_id, client_credential=self._credential(),
                        **self._app_kwargs(),
                    )
                    result = app.acquire_token_for_client(scopes=self.scopes)
                else:
                    result = self.public_app().acquire_token_by_refresh_token(
                        refresh_token, scopes=self.scopes
                    )
        except MailpipeError:
            raise
        except Exception as exc:  # msal/PyJWT: a key it cannot sign with, bad PEM
            raise ClientRejected(
                f"{self.where}: the client credential cannot be used "
                f"({type(exc).__name__}; the certificate needs an RSA key)",
                code="bad_credential",
            ) from None
        watch = self._retry_after
        return grant_from(
            result, where=self.where, retry_after=watch.value if watch else None
        )


def grant_from(
    result: dict[str, Any], *, where: str, retry_after: float | None = None
) -> Grant:
    """A msal result as a Grant, or the classified error (``retry_after``: the
    delay the endpoint's last response asked for)."""
    if "access_token" not in result:
        raise error_from(
            str(result.get("error", "unknown_error")),
            str(result.get("error_description", "")),
            where=where,
            retry_after=retry_after,
        )
    return Grant(
        access_token=str(result["access_token"]),
        expires_in=float(result.get("expires_in", 3600)),
        refresh_token=str(result.get("refresh_token", "")),
        scope=str(result.get("scope", "")),
    )
