"""The ``pop3`` source's options: one mailbox table of ``source = "pop3"``.

Connection security is shared with IMAP (:class:`mailpipe.tls.ConnectionSecurity`),
credentials and OAuth go through :mod:`mailpipe.credentials`; the timeouts, the
pipelining window and the size limits bound one session, and ``verify_size`` says what
becomes of a body received shorter than its LIST size (MP-01).
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from mailpipe.credentials import check_auth_has_credentials, check_token_when_needed
from mailpipe.oauth.table import OAuthOptions
from mailpipe.secrets import Secret
from mailpipe.tls import ConnectionSecurity
from mailpipe.units import ByteSize, Duration


class Pop3Options(ConnectionSecurity):
    """Options of a ``source = "pop3"`` mailbox (the mailbox table's other keys).

    The connection-security keys (``security``, ``ca_file``, ``cert_sha256``,
    ``tls_verify``, ``allow_plaintext_password``) come from
    :class:`mailpipe.tls.ConnectionSecurity`, shared with the IMAP source.
    """

    model_config = ConfigDict(extra="forbid", defer_build=True)

    host: str = Field(description="POP3 server host name; also the TLS name verified.")
    port: int | None = Field(
        strict=True,
        default=None,
        ge=1,
        le=65535,
        description="TCP port; default 995 for security = 'tls', 110 otherwise.",
    )
    username: str = Field(description="Login name (also the OAuth user).")
    password: Secret | None = Field(
        default=None,
        description="Password: a string, {env=...}, {file=...} or {command=[...]}.",
    )
    auth: Literal[
        "auto", "user", "apop", "plain", "login", "cram-md5", "scram-sha-1",
        "scram-sha-256", "xoauth2", "oauthbearer",
    ] = Field(
        default="auto",
        description="Authentication method; 'auto' picks from CAPA after TLS "
        "(OAuth when a token is set, else SCRAM-SHA-256, PLAIN, USER/PASS, LOGIN). "
        "APOP, CRAM-MD5 and SCRAM-SHA-1 are used only when named here.",
    )
    oauth: OAuthOptions | None = Field(
        default=None,
        description="Built-in OAuth 2 (XOAUTH2/OAUTHBEARER): { provider = "
        "'microsoft' | 'google' | 'oidc', ... }; tokens come from the shared cache "
        "and are refreshed before they expire (see mailpipe.oauth).",
    )
    oauth_token: Secret | None = Field(
        default=None,
        validate_default=True,
        description="OAuth 2 access token for XOAUTH2/OAUTHBEARER; a {command=[...]} "
        "secret runs again for every session (fresh token). Not with oauth.",
    )
    connect_timeout: Duration = Field(
        default=30.0, gt=0, description="TCP connect timeout."
    )
    tls_timeout: Duration = Field(
        default=30.0, gt=0, description="TLS handshake timeout."
    )
    greeting_timeout: Duration = Field(
        default=60.0, gt=0, description="Time allowed for the server greeting."
    )
    read_timeout: Duration = Field(
        default=120.0, gt=0, description="Inactivity timeout for each read of a reply."
    )
    retr_timeout: Duration = Field(
        default=600.0,
        gt=0,
        description="Overall deadline of one RETR reply, at least this long; more "
        "for big messages (see retr_min_rate). Stops a server that trickles bytes.",
    )
    retr_min_rate: ByteSize = Field(
        default=50_000,
        ge=1,
        description="Slowest RETR transfer allowed, in octets per second: the "
        "deadline is the larger of retr_timeout and the LIST size over this rate.",
    )
    pipelining: Literal["auto", "off"] = Field(
        default="auto",
        description="'auto': pipeline commands when CAPA lists PIPELINING; 'off': "
        "one command at a time.",
    )
    pipeline_window: int = Field(
        strict=True,
        default=128, ge=1, le=1000, description="Most commands in flight when pipelining "
        "(DELEs, answered by one line each, are bounded by 4 KiB of command bytes alone)."
    )
    max_line: int = Field(
        strict=True,
        default=8192, ge=512, le=1 << 20,
        description="Longest status line accepted from the server, in octets.",
    )
    max_message: ByteSize = Field(
        default=256 * 2**20,
        ge=1,
        description="Hard cap on one message, in octets, whatever LIST says: the "
        "transfer stops there and the message is left on the server (or deleted "
        "unread under on_oversize = 'delete').",
    )
    chunk_size: ByteSize = Field(
        default=256 * 1024, ge=4096, description="Read size; bounds memory per message."
    )
    verify_size: Literal["strict", "confirm", "off"] = Field(
        default="strict",
        description="A message received shorter than its LIST size allows (beyond "
        "line-end and dot-stuffing slack) is cut short: 'strict' never commits it (it "
        "stays on the server and is retried); 'confirm' commits it once the same "
        "octets arrived in two sessions with sound framing and no TOP before them (for "
        "servers that list estimated sizes, such as Exchange with "
        "EnableExactRFC822Size off); 'off' commits what arrives.",
    )
    utf8: bool = Field(
        default=True,
        strict=True,
        description="Send UTF8 (RFC 6856) when CAPA lists it, so that a server such "
        "as Courier serves messages with 8-bit headers as they are instead of a "
        "notice.",
    )

    # Cross-field checks are field validators on a later field, so an error names a
    # key and never echoes the whole table (which holds the password) as its input.
    _auth_has_credentials = field_validator("auth")(check_auth_has_credentials)
    _token_when_needed = field_validator("oauth_token")(check_token_when_needed)

    @property
    def effective_port(self) -> int:
        """The configured port, or 995 for implicit TLS and 110 otherwise."""
        if self.port is not None:
            return self.port
        return 995 if self.security == "tls" else 110


__all__ = ["Pop3Options"]
