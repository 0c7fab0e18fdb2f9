"""The ``imap`` source's options: one mailbox table of ``source = "imap"``.

Connection security is shared with POP3 (:class:`mailpipe.tls.ConnectionSecurity`),
credentials and OAuth through :mod:`mailpipe.credentials`; folders are checked as
modified UTF-7 wire names (IC-23); the selection keys (``select``, ``since``,
``since_days``) make the ``UID SEARCH`` criteria and the cursor scope's suffix
(MP-05); the push keys bound the IDLE pool (IC-43/IC-44).
"""

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mailpipe.credentials import check_auth_has_credentials, check_token_when_needed
from mailpipe.oauth.table import OAuthOptions
from mailpipe.secrets import Secret
from mailpipe.tls import ConnectionSecurity
from mailpipe.units import ByteSize, Duration

from .push import IDLE_RENEW, MAX_IDLE_CONNECTIONS, STATUS_INTERVAL

SASL_NAMES = {
    "plain": "PLAIN", "scram-sha-1": "SCRAM-SHA-1", "scram-sha-256": "SCRAM-SHA-256",
    "xoauth2": "XOAUTH2", "oauthbearer": "OAUTHBEARER",
}


class ImapOptions(ConnectionSecurity):
    """Options of a ``source = "imap"`` mailbox (the mailbox table's other keys).

    The connection-security keys come from :class:`mailpipe.tls.ConnectionSecurity`,
    shared with POP3. How processed mail is acknowledged is the mailbox's core
    ``acknowledge`` key: ``"delete"`` (``\\Deleted`` + ``UID EXPUNGE``),
    ``{ move = "Processed" }`` or ``{ flag = "\\\\Seen" }`` / ``{ flag = "$Processed" }``;
    with ``delete = "never"`` nothing changes on the server (keep).
    """

    host: str = Field(description="IMAP server host name; also the TLS name verified.")
    port: int | None = Field(
        strict=True,
        default=None,
        ge=1,
        le=65535,
        description="TCP port; default 993 for security = 'tls', 143 otherwise.",
    )
    username: str = Field(description="Login name (also the OAuth user).")
    password: Secret | None = Field(
        default=None,
        description="Password: a string, {env=...}, {file=...} or {command=[...]}.",
    )
    auth: Literal[
        "auto", "login", "plain", "scram-sha-1", "scram-sha-256", "xoauth2", "oauthbearer"
    ] = Field(
        default="auto",
        description="Authentication; 'auto' picks from the post-TLS capabilities "
        "(OAuth when a token is set, else SCRAM-SHA-256, PLAIN, LOGIN).",
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
    folders: list[str] = Field(
        default=["INBOX"],
        min_length=1,
        description="Folders to read, by display name (non-ASCII names are sent in "
        "modified UTF-7), e.g. ['INBOX', 'Support/Escalations'].",
    )
    select: Literal["all", "unseen"] = Field(
        default="all",
        description="Which new mail to take: 'all', or 'unseen' (UID SEARCH UNSEEN: "
        "mail without \\Seen; reading never sets it, IC-30).",
    )
    since: date | None = Field(
        default=None,
        description="Only mail whose INTERNALDATE is on or after this day "
        "(YYYY-MM-DD; UID SEARCH SINCE). Not with since_days.",
    )
    since_days: int | None = Field(
        strict=True, default=None, ge=0, le=36500,
        description="Only mail received in the last N days (UID SEARCH SINCE today "
        "minus N, UTC). Not with since.",
    )
    connect_timeout: Duration = Field(default=30.0, gt=0, description="TCP connect timeout.")
    tls_timeout: Duration = Field(default=30.0, gt=0, description="TLS handshake timeout.")
    greeting_timeout: Duration = Field(
        default=60.0, gt=0, description="Time allowed for the server greeting."
    )
    read_timeout: Duration = Field(
        default=120.0, gt=0, description="Inactivity timeout for each read."
    )
    fetch_window: int = Field(
        strict=True, default=64, ge=1, le=1000,
        description="Most UID FETCH commands in flight (pipelining).",
    )
    chunk_size: ByteSize = Field(
        default=256 * 1024, ge=4096, description="Read size; bounds memory per message."
    )
    max_message: ByteSize = Field(
        default=2**40, ge=1,
        description="Hard cap on one message, in octets: a larger FETCH literal stops "
        "the session and the message is left on the server.",
    )
    idle_connections: int | None = Field(
        strict=True, default=None, ge=0, le=MAX_IDLE_CONNECTIONS,
        description="Push: how many folders get an IDLE connection of their "
        "own, in the order of folders; default one per folder up to "
        f"{MAX_IDLE_CONNECTIONS}. The other folders are polled with STATUS on one "
        "shared connection every status_interval.",
    )
    idle_renew: Duration = Field(
        default=IDLE_RENEW, gt=0, lt=29 * 60,
        description="Push: IDLE is ended with DONE and issued again after this "
        "long (RFC 2177: under 29 minutes).",
    )
    status_interval: Duration = Field(
        default=STATUS_INTERVAL, gt=0,
        description="Push: seconds between two STATUS (UIDNEXT) checks of the "
        "folders without an IDLE connection (every folder when the server has no IDLE).",
    )

    # Cross-field checks shared with POP3 (mailpipe.credentials): an error names a key
    # and never echoes the table, which may hold the password.
    _auth_has_credentials = field_validator("auth")(check_auth_has_credentials)
    _token_when_needed = field_validator("oauth_token")(check_token_when_needed)

    @field_validator("folders")
    @classmethod
    def _folder_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name or any(c in name for c in "\r\n\0"):
                raise ValueError(f"folder name {name!r} is empty or holds CR, LF or NUL")
        if len(set(names)) != len(names):
            raise ValueError("a folder is listed twice")
        return names

    @field_validator("select", mode="before")
    @classmethod
    def _select_word(cls, value: Any) -> Any:
        if value not in ("all", "unseen"):
            raise ValueError(f"select = {value!r}: expected 'all' or 'unseen'")
        return value

    @field_validator("since", mode="before")
    @classmethod
    def _since_day(cls, value: Any) -> Any:
        if isinstance(value, datetime):
            value = value.date()
        if isinstance(value, date) or value is None:
            return value
        try:
            if not isinstance(value, str) or not _DAY.fullmatch(value):
                raise ValueError
            return date.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"since = {value!r}: expected a day as YYYY-MM-DD, e.g. '2026-02-01'"
            ) from None

    @model_validator(mode="after")
    def _one_since(self) -> "ImapOptions":
        if self.since is not None and self.since_days is not None:
            raise ValueError("set since or since_days, not both")
        return self

    def selection(self) -> str:
        """The configured selection as it enters the cursor scope (MP-05): ``""``
        for every message, else e.g. ``"unseen;since_days=7"`` (the setting, not the
        day it gives: the window moves, mail it passed stays passed)."""
        words = ["unseen"] if self.select == "unseen" else []
        if self.since is not None:
            words.append(f"since={self.since.isoformat()}")
        if self.since_days is not None:
            words.append(f"since_days={self.since_days}")
        return ";".join(words)

    def search_criteria(self, after: int, today: date | None = None) -> str | None:
        """The ``UID SEARCH`` criteria for mail past UID ``after`` under ``select``,
        ``since`` and ``since_days`` (IC-26, IC-33; dates formatted by code, IS-08);
        None when every message past ``after`` is wanted (a plain ``UID FETCH``)."""
        words = [f"UID {after + 1}:*"] if after else []
        if self.select == "unseen":
            words.append("UNSEEN")
        day = self.since
        if self.since_days is not None:
            day = (today or datetime.now(UTC).date()) - timedelta(days=self.since_days)
        if day is not None:
            words.append(f"SINCE {imap_date(day)}")
        if len(words) == (1 if after else 0):
            return None
        return " ".join(words)

    @model_validator(mode="after")
    def _idle_within_folders(self) -> "ImapOptions":
        if self.idle_connections is not None and self.idle_connections > len(self.folders):
            raise ValueError(
                f"idle_connections = {self.idle_connections} is more than the "
                f"{len(self.folders)} folder(s) listed in folders"
            )
        return self

    @property
    def effective_port(self) -> int:
        """The configured port, or 993 for implicit TLS and 143 otherwise."""
        if self.port is not None:
            return self.port
        return 993 if self.security == "tls" else 143

_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def imap_date(day: date) -> str:
    """``day`` as an IMAP search date (RFC 3501 §9 ``date``): ``1-Feb-2026``, with
    English month names whatever the locale."""
    return f"{day.day}-{_MONTHS[day.month - 1]}-{day.year}"


__all__ = ["SASL_NAMES", "ImapOptions", "imap_date"]
