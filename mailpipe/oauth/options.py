"""The ``oauth = { provider = ..., ... }`` table of a mailbox, validated with clear errors.

One model per provider, told apart by ``provider``; each names the flows it supports.
Cross-field rules are field validators on a later field, so an error names one key and
never echoes the table (which may hold a client secret) as its input.
"""

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mailpipe.oauth.scopes import Protocol, default_scopes
from mailpipe.oauth.table import OAuthOptions as OAuthOptions  # its former home
from mailpipe.secrets import Secret
from mailpipe.units import Duration

MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    client_id: str = Field(min_length=1, description="The application (client) id.")
    scopes: list[str] | None = Field(
        default=None,
        description="Scopes to ask for; default: the provider's for the protocol "
        "(see mailpipe.oauth.scopes).",
    )
    cache_key: Secret = Field(
        description="Key that encrypts the token cache at rest (a Fernet key: 32 "
        "url-safe base64 bytes, `mailpipe auth keygen`): {env=...}, {file=...} or "
        "{command=[...]}. Every mailbox sharing an account needs the same key.",
    )
    ca_file: Path | None = Field(
        default=None,
        description="PEM of CA certificates trusted for the token endpoint instead of "
        "the system store (verification is never turned off).",
    )
    refresh_margin: Duration = Field(
        default=300.0,
        ge=0,
        description="Refresh an access token this long before it expires.",
    )
    refresh_jitter: Duration = Field(
        default=60.0,
        ge=0,
        description="Up to this much earlier again, chosen at random per token, so "
        "workers and accounts do not refresh in step.",
    )
    refresh_token_max_age: Duration = Field(
        default=90 * 86400.0,
        gt=0,
        description="Age after which an unused refresh token is considered at risk "
        "(Microsoft: 90 days of inactivity; Google: 6 months).",
    )
    timeout: Duration = Field(
        default=30.0, gt=0, description="Timeout of each token endpoint request."
    )

    # Where the token cache lives: the journal of the config this table came from
    # (``[state] path``, handed over in the validation context), and the config's
    # folder, against which relative paths resolve.
    _state_path: str | None = PrivateAttr(default=None)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _from_context(self, info: ValidationInfo) -> Self:
        ctx = info.context if isinstance(info.context, dict) else {}
        if ctx.get("base_dir"):
            self._base_dir = Path(str(ctx["base_dir"]))
        state = ctx.get("state_path")
        self._state_path = str(state) if state else None
        for name in ("ca_file", "certificate", "service_account_file"):
            value = getattr(self, name, None)
            if isinstance(value, Path) and not value.expanduser().is_absolute():
                object.__setattr__(self, name, self._base_dir / value)
        return self

    @property
    def state_path(self) -> str | None:
        """The ``[state] path`` of the config (None outside a config)."""
        return self._state_path

    @property
    def base_dir(self) -> Path:
        """The config file's folder."""
        return self._base_dir

    def effective_scopes(self, protocol: Protocol) -> tuple[str, ...]:
        """The configured scopes, or the provider's defaults for ``protocol``."""
        if self.scopes is not None:
            return tuple(self.scopes)
        flow = str(getattr(self, "flow", ""))
        provider = str(getattr(self, "provider", ""))
        return default_scopes(provider, flow, protocol)

    def endpoint(self) -> str:
        """Where tokens come from (part of the cache account key)."""
        raise NotImplementedError

    def identity(self) -> str:
        """Whose tokens these are, beyond the client (subject, tenant...)."""
        return ""

    def account_key(self, protocol: Protocol, username: str) -> str:
        """The cache key shared by every mailbox of one account.

        App-only tokens (client credentials, service accounts without a subject) do
        not depend on the mailbox user, so all shared mailboxes of one app share one
        entry; delegated tokens belong to one user.
        """
        flow = str(getattr(self, "flow", ""))
        user = "" if flow == "client_credentials" else (self.identity() or username)
        parts = [
            str(getattr(self, "provider", "")),
            flow,
            self.endpoint(),
            self.client_id,
            user.lower(),
            " ".join(sorted(self.effective_scopes(protocol))),
        ]
        digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]
        return f"{parts[0]}:{digest}"


class MicrosoftOAuth(_Common):
    """Microsoft identity platform (Entra ID) through ``msal``."""

    provider: Literal["microsoft"]
    flow: Literal["client_credentials", "device_code"] = Field(
        description="'client_credentials': app-only (POP.AccessAsApp / "
        "IMAP.AccessAsApp, shared mailboxes), needs client_secret or certificate; "
        "'device_code': delegated, a refresh token from `mailpipe auth login` "
        "(public client: no secret)."
    )
    tenant: str = Field(
        default="organizations",
        validate_default=True,
        min_length=1,
        description="Directory (tenant) id or domain; client_credentials needs a "
        "real tenant, not 'organizations' or 'common'.",
    )
    authority: str | None = Field(
        default=None,
        pattern=r"^https://",
        description="Authority URL; default https://login.microsoftonline.com/TENANT.",
    )
    client_secret: Secret | None = Field(
        default=None, description="Client secret (client_credentials only)."
    )
    certificate: Path | None = Field(
        default=None,
        validate_default=True,
        description="PEM file holding the app's private key and certificate "
        "(client_credentials; instead of client_secret).",
    )
    certificate_thumbprint: str | None = Field(
        default=None,
        pattern=r"^[0-9A-Fa-f]{40}$",
        description="SHA-1 thumbprint of the certificate as Azure shows it "
        "(computed from the PEM when omitted).",
    )

    @field_validator("tenant")
    @classmethod
    def _tenant_for_flow(cls, tenant: str, info: ValidationInfo) -> str:
        if info.data.get("flow") == "client_credentials" and tenant in (
            "organizations",
            "common",
            "consumers",
        ):
            raise ValueError(
                f"flow = 'client_credentials' needs the directory (tenant) id or "
                f"domain, not {tenant!r}"
            )
        return tenant

    @field_validator("client_secret")
    @classmethod
    def _public_has_no_secret(
        cls, secret: Secret | None, info: ValidationInfo
    ) -> Secret | None:
        if info.data.get("flow") == "device_code" and secret is not None:
            # AADSTS700025: a public client must not present a secret or assertion.
            raise ValueError(
                "flow = 'device_code' is a public client: remove client_secret "
                "(Microsoft refuses it, AADSTS700025)"
            )
        return secret

    @field_validator("certificate")
    @classmethod
    def _one_credential(cls, cert: Path | None, info: ValidationInfo) -> Path | None:
        flow = info.data.get("flow")
        secret = info.data.get("client_secret")
        if flow == "device_code" and cert is not None:
            raise ValueError(
                "flow = 'device_code' is a public client: remove certificate "
                "(Microsoft refuses it, AADSTS700025)"
            )
        if flow == "client_credentials" and cert is not None and secret is not None:
            raise ValueError("set client_secret or certificate, not both")
        if flow == "client_credentials" and cert is None and secret is None and (
            "client_secret" in info.data  # not when the secret failed on its own
        ):
            raise ValueError(
                "flow = 'client_credentials' needs client_secret or certificate"
            )
        return cert

    def authority_url(self) -> str:
        """The authority msal talks to."""
        return (self.authority or f"{MICROSOFT_AUTHORITY}/{self.tenant}").rstrip("/")

    def endpoint(self) -> str:
        return self.authority_url()


class GoogleOAuth(_Common):
    """Google through ``google-auth``."""

    provider: Literal["google"]
    flow: Literal["service_account", "refresh_token"] = Field(
        description="'service_account': a service account key with domain-wide "
        "delegation acting as `subject`; 'refresh_token': an installed-app client "
        "with a refresh token from `mailpipe auth login`."
    )
    client_id: str = Field(
        default="",
        description="OAuth client id (refresh_token flow); the service account's "
        "own id is read from its key file.",
    )
    client_secret: Secret | None = Field(
        default=None, description="Installed-app client secret (refresh_token flow)."
    )
    service_account_file: Path | None = Field(
        default=None, description="The service account's JSON key file."
    )
    subject: str | None = Field(
        default=None,
        description="The Workspace user the service account acts as (domain-wide "
        "delegation); default: the mailbox username.",
    )
    auth_uri: str = Field(
        default="https://accounts.google.com/o/oauth2/v2/auth",
        pattern=r"^https://",
        description="Authorization endpoint of the browser sign-in (refresh_token).",
    )
    token_uri: str = Field(
        default=GOOGLE_TOKEN_URI,
        validate_default=True,
        pattern=r"^https://",
        description="Token endpoint (the default is Google's).",
    )

    @field_validator("token_uri")
    @classmethod
    def _flow_needs(cls, uri: str, info: ValidationInfo) -> str:
        flow = info.data.get("flow")
        if flow == "service_account" and info.data.get("service_account_file") is None:
            raise ValueError("flow = 'service_account' needs service_account_file")
        if flow == "refresh_token" and not info.data.get("client_id"):
            raise ValueError("flow = 'refresh_token' needs client_id")
        if flow == "refresh_token" and info.data.get("client_secret") is None:
            raise ValueError("flow = 'refresh_token' needs client_secret")
        return uri

    def endpoint(self) -> str:
        return self.token_uri

    def identity(self) -> str:
        return self.subject or ""


class OidcOAuth(_Common):
    """Any OpenID Connect / OAuth 2.0 provider through ``authlib``."""

    provider: Literal["oidc"]
    flow: Literal["refresh_token", "client_credentials"] = Field(
        description="'refresh_token': a refresh token from `mailpipe auth login` "
        "(device code); 'client_credentials': app-only."
    )
    issuer: str | None = Field(
        default=None,
        pattern=r"^https://",
        description="Issuer URL; endpoints come from its "
        "/.well-known/openid-configuration unless token_endpoint is set.",
    )
    token_endpoint: str | None = Field(
        default=None,
        validate_default=True,
        pattern=r"^https://",
        description="Token endpoint URL.",
    )
    device_authorization_endpoint: str | None = Field(
        default=None,
        pattern=r"^https://",
        description="Device authorization endpoint (for `mailpipe auth login`).",
    )
    client_secret: Secret | None = Field(
        default=None,
        validate_default=True,
        description="Client secret (confidential clients).",
    )
    audience: str | None = Field(
        default=None, description="`audience` parameter sent with the token request."
    )

    @field_validator("token_endpoint")
    @classmethod
    def _where_from(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is None and info.data.get("issuer") is None and "issuer" in info.data:
            raise ValueError("set issuer or token_endpoint")
        return url

    @field_validator("client_secret")
    @classmethod
    def _confidential(cls, secret: Secret | None, info: ValidationInfo) -> Secret | None:
        if info.data.get("flow") == "client_credentials" and secret is None:
            raise ValueError("flow = 'client_credentials' needs client_secret")
        return secret

    def endpoint(self) -> str:
        return self.token_endpoint or self.issuer or ""


class _Provider(BaseModel):
    model_config = ConfigDict(defer_build=True)

    provider: Literal["microsoft", "google", "oidc"]


AnyOAuth = MicrosoftOAuth | GoogleOAuth | OidcOAuth
_MODELS: dict[str, type[AnyOAuth]] = {
    "microsoft": MicrosoftOAuth, "google": GoogleOAuth, "oidc": OidcOAuth
}


@cache
def provider_union() -> TypeAdapter[AnyOAuth]:
    """The three models as one union: the ``oauth`` table's JSON Schema, and what a
    value other than a table meets."""
    return TypeAdapter(AnyOAuth)


def validate_table(value: Any, info: ValidationInfo) -> AnyOAuth:
    """Validate an ``oauth`` table (:data:`mailpipe.oauth.table.OAuthOptions`).

    The provider's own model validates it, so an error names the TOML key
    (oauth.client_id, oauth.provider) and shows only that key's value.
    """
    if isinstance(value, dict):
        provider = value.get("provider")
        model = _MODELS.get(provider) if isinstance(provider, str) else None
        if model is not None:
            return model.model_validate(value, context=info.context)
        _Provider.model_validate({"provider": provider} if "provider" in value else {})
    # Not a table (a model instance passes; anything else fails as the union does).
    return provider_union().validate_python(value, context=info.context)
