"""Any OpenID Connect / OAuth 2.0 provider through ``authlib``: refresh token or
client credentials, endpoints from discovery or configured."""

from __future__ import annotations

from typing import Any

from mailpipe.oauth.grant import (
    Grant,
    RetryAfterWatch,
    error_from,
    transport_errors,
    trust,
)
from mailpipe.oauth.options import OidcOAuth
from mailpipe.oauth.scopes import Protocol


class OidcFlow:
    """:class:`~mailpipe.oauth.grant.Flow` for ``provider = "oidc"``."""

    def __init__(self, options: OidcOAuth, protocol: Protocol) -> None:
        self.options = options
        self.scopes = list(options.effective_scopes(protocol))
        self.needs_refresh_token = options.flow == "refresh_token"
        self.where = f"oidc {options.endpoint()}"
        self._metadata: dict[str, Any] | None = None

    def session(self) -> Any:
        """An authlib requests session trusting ``ca_file`` (verified TLS)."""
        from authlib.integrations.requests_client import OAuth2Session

        o = self.options
        secret = o.client_secret.get() if o.client_secret is not None else None
        session = OAuth2Session(
            o.client_id,
            secret,
            scope=" ".join(self.scopes) or None,
            token_endpoint_auth_method="client_secret_basic" if secret else "none",
        )
        return trust(session, o.ca_file)

    def metadata(self) -> dict[str, Any]:
        """The issuer's discovery document (fetched once), or the configured ends."""
        o = self.options
        if self._metadata is None:
            meta: dict[str, Any] = {}
            if o.issuer is not None and (
                o.token_endpoint is None or o.device_authorization_endpoint is None
            ):
                url = o.issuer.rstrip("/") + "/.well-known/openid-configuration"
                with transport_errors(self.where):
                    resp = self.session().get(
                        url, timeout=o.timeout, withhold_token=True
                    )
                if resp.status_code != 200:
                    raise error_from(
                        "temporarily_unavailable", "", where=f"oidc discovery {url}"
                    )
                meta = dict(resp.json())
            if o.token_endpoint:
                meta["token_endpoint"] = o.token_endpoint
            if o.device_authorization_endpoint:
                meta["device_authorization_endpoint"] = o.device_authorization_endpoint
            self._metadata = meta
        return self._metadata

    def acquire(self, refresh_token: str) -> Grant:
        """One token request: refresh_token or client_credentials grant."""
        from authlib.integrations.base_client.errors import OAuthError

        o = self.options
        url = str(self.metadata()["token_endpoint"])
        session = self.session()
        watch = RetryAfterWatch(session)
        try:
            with transport_errors(self.where):
                if o.flow == "refresh_token":
                    token = session.refresh_token(
                        url, refresh_token=refresh_token, timeout=o.timeout
                    )
                else:
                    extra = {"audience": o.audience} if o.audience else {}
                    token = session.fetch_token(
                        url, grant_type="client_credentials", timeout=o.timeout,
                        **extra,
                    )
        except OAuthError as exc:
            raise error_from(
                str(exc.error or "unknown_error"),
                str(exc.description or ""),
                where=self.where,
                retry_after=watch.value,
            ) from None
        except ValueError:  # not JSON (a proxy's 429 or 502 page)
            raise error_from(
                "temporarily_unavailable", "", where=self.where,
                retry_after=watch.value,
            ) from None
        return Grant(
            access_token=str(token["access_token"]),
            expires_in=float(token.get("expires_in", 3600)),
            refresh_token=str(token.get("refresh_token", "") or ""),
            scope=str(token.get("scope", "")),
        )
