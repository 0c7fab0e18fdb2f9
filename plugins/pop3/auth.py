"""POP3 authentication as pure functions; the SASL mechanisms live in :mod:`mailpipe.sasl`.

Mechanisms (RFC 1939 §7 USER/PASS and APOP; RFC 5034 SASL with RFC 4616 PLAIN, LOGIN,
RFC 2195 CRAM-MD5, RFC 5802/7677 SCRAM-SHA-1 and SCRAM-SHA-256, Google/Microsoft XOAUTH2,
RFC 7628 OAUTHBEARER), the choice among them (conformance C-42: never a silent downgrade, never OAuth → password) and the
classification of a ``-ERR`` into the typed errors the scheduler acts on (C-31).
"""

from __future__ import annotations

import hashlib
from typing import Final

from mailpipe.errors import (
    AuthenticationError,
    SourceBusyError,
    SourceError,
    SourcePermanentError,
)
from mailpipe.sasl import (  # the mechanisms are shared with the IMAP source
    MAX_SCRAM_ITERATIONS,
    CramMd5,
    Login,
    Mechanism,
    OAuthBearer,
    Plain,
    SaslCancel,
    SaslVerifyError,
    Scram,
    XOAuth2,
    b64decode_strict,
    b64encode,
    saslname,
    saslprep,
)

from .events import Capabilities, Err, code_class

__all__ = [
    "AUTH_CHOICES",
    "MAX_SCRAM_ITERATIONS",
    "OAUTH",
    "SASL_NAMES",
    "CramMd5",
    "Login",
    "Mechanism",
    "OAuthBearer",
    "Plain",
    "SaslCancel",
    "SaslVerifyError",
    "Scram",
    "XOAuth2",
    "apop_digest",
    "b64decode_strict",
    "b64encode",
    "choose",
    "classify",
    "initial_response_fits",
    "saslname",
    "saslprep",
]

#: What ``auth = ...`` may say.
AUTH_CHOICES: Final = (
    "auto", "user", "apop", "plain", "login", "cram-md5", "scram-sha-1",
    "scram-sha-256", "xoauth2", "oauthbearer",
)
SASL_NAMES: Final = {
    "plain": "PLAIN", "login": "LOGIN", "cram-md5": "CRAM-MD5",
    "scram-sha-1": "SCRAM-SHA-1", "scram-sha-256": "SCRAM-SHA-256",
    "xoauth2": "XOAUTH2", "oauthbearer": "OAUTHBEARER",
}
OAUTH: Final = frozenset({"xoauth2", "oauthbearer"})


def apop_digest(timestamp: bytes, secret: str) -> str:
    """RFC 1939 §7: lower-case hex MD5 of the greeting timestamp followed by the secret."""
    return hashlib.md5(timestamp + secret.encode("utf-8")).hexdigest()


def initial_response_fits(mechanism: str, encoded: str) -> bool:
    """RFC 5034 §4: an initial response only if the whole AUTH line is ≤ 255 octets."""
    return len(f"AUTH {mechanism} {encoded}\r\n") <= 255


# --- choosing a mechanism ----------------------------------------------------------


def choose(
    auth: str,
    capabilities: Capabilities | None,
    *,
    has_password: bool,
    has_token: bool,
    apop_timestamp: bytes | None,
) -> str:
    """Return the method to use: ``user``, ``apop`` or a SASL choice from AUTH_CHOICES.

    ``capabilities`` is the CAPA taken *after* TLS (S-04), or None when CAPA failed.
    Policy (C-42, S-08, S-09): OAuth when a token is configured (OAUTHBEARER, then
    XOAUTH2), never falling back to a password; with a password, SCRAM-SHA-256 (the
    password never crosses the wire), then PLAIN, then USER/PASS, then LOGIN; APOP,
    CRAM-MD5 and SCRAM-SHA-1 only when configured. A configured mechanism the server
    does not offer is refused, never silently replaced.

    Raises:
        SourcePermanentError: nothing acceptable is offered (a configuration problem).
    """
    sasl = capabilities.sasl if capabilities is not None else ()
    if auth == "auto":
        if has_token:
            for mech in ("oauthbearer", "xoauth2"):
                if SASL_NAMES[mech] in sasl:
                    return mech
            raise SourcePermanentError(
                "an OAuth token is configured but the server offers neither OAUTHBEARER "
                f"nor XOAUTH2 (SASL: {' '.join(sasl) or 'none'}); "
                "mailpipe never falls back to a password"
            )
        if not has_password:
            raise SourcePermanentError("no password or oauth_token configured")
        if "SCRAM-SHA-256" in sasl:  # C-42, S-09: preferred when present
            return "scram-sha-256"
        if "PLAIN" in sasl:
            return "plain"
        if capabilities is None or "USER" in capabilities:
            return "user"
        if "LOGIN" in sasl:
            return "login"
        raise SourcePermanentError(
            "the server offers no password mechanism mailpipe uses automatically "
            f"(SASL: {' '.join(sasl) or 'none'}; no USER); set auth explicitly"
        )
    if auth in OAUTH and not has_token:
        raise SourcePermanentError(f"auth = {auth!r} needs oauth_token")
    if auth not in OAUTH and not has_password:
        raise SourcePermanentError(f"auth = {auth!r} needs a password")
    if auth == "apop":
        if apop_timestamp is None:
            # T-17: never silently switch to PASS.
            raise SourcePermanentError(
                "auth = 'apop' but the greeting carries no valid APOP timestamp"
            )
        return auth
    if auth == "user":
        if capabilities is not None and "USER" not in capabilities:
            # C-28: a server with CAPA but no USER tag must not get USER/PASS.
            raise SourcePermanentError("auth = 'user' but CAPA does not list USER")
        return auth
    if auth in SASL_NAMES:
        if capabilities is not None and SASL_NAMES[auth] not in sasl:
            raise SourcePermanentError(
                f"auth = {auth!r} but the server does not offer SASL {SASL_NAMES[auth]} "
                f"(offered: {' '.join(sasl) or 'none'}); refusing to downgrade"
            )
        return auth
    raise SourcePermanentError(f"unknown auth method {auth!r}")


# --- classifying refusals ------------------------------------------------------------

_BUSY_HINTS: Final = ("lock", "in use", "in-use", "busy")


def classify(
    err: Err,
    *,
    host: str,
    during: str,
    capabilities: Capabilities | None = None,
    authenticating: bool = True,
) -> SourceError:
    """Map a ``-ERR`` reply to a typed error (C-30, C-31, T-19, T-20).

    Known codes are honoured even without RESP-CODES (C-30 POLICY); without a code,
    "lock"/"in use" texts are taken as IN-USE (fetchmail's heuristic) and, when
    AUTH-RESP-CODE is advertised, a code-less refusal is SYS/TEMP (RFC 3206 §6).
    Otherwise a refusal while authenticating is bad credentials.
    """
    code = code_class(err.code)
    text = _sanitise(err.text)
    where = f"{host}: {during} refused: {text or '-ERR'}"
    lowered = err.text.lower()
    if not code and any(h in lowered for h in _BUSY_HINTS):
        code = "IN-USE"
    if code == "LOGIN-DELAY":
        delay = capabilities.login_delay if capabilities is not None else None
        return SourceBusyError(where, code=code, retry_after=float(delay or 300))
    if code in ("IN-USE", "SYS/TEMP"):
        return SourceBusyError(where, code=code)
    if code == "SYS/PERM":
        return SourcePermanentError(where, code=code)
    if code == "AUTH":
        return AuthenticationError(where)
    if authenticating:
        if capabilities is not None and "AUTH-RESP-CODE" in capabilities:
            return SourceBusyError(where, code="SYS/TEMP")
        return AuthenticationError(where)
    return SourcePermanentError(where, code=err.code)


def _sanitise(text: str) -> str:
    # S-12: strip C0/C1 controls and escapes from server text before showing it.
    return "".join(ch for ch in text if ch.isprintable())[:200]
