"""S/MIME and PGP/MIME recognition: what kind of wrapper a part is and who claims to
have signed it. Nothing here checks a signature against a trust store."""

from __future__ import annotations

import base64
import re
import warnings
from typing import Final, Literal

from .cms import AUTH_ENVELOPED_DATA, ENVELOPED_DATA, SIGNED_DATA, content_type

PKCS7_MIME: Final = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})
PKCS7_SIGNATURE: Final = frozenset(
    {"application/pkcs7-signature", "application/x-pkcs7-signature"}
)
PGP_SIGNATURE: Final = "application/pgp-signature"
PGP_ENCRYPTED: Final = "application/pgp-encrypted"
_INLINE_PGP: Final = re.compile(
    r"^-----BEGIN PGP (MESSAGE|SIGNED MESSAGE)-----\s*$", re.M
)
_PEM: Final = re.compile(rb"-----BEGIN [A-Z0-9 ]+-----([A-Za-z0-9+/=\s]+)-----END")


def der_of(data: bytes) -> bytes:
    """DER bytes of a CMS blob given as DER, PEM, or base64 (some clients double
    encode)."""
    if data[:1] == b"\x30":
        return data
    m = _PEM.search(data)
    text = m.group(1) if m else data
    try:
        return base64.b64decode(b"".join(text.split()), validate=False)
    except ValueError:
        return data


def cms_kind(data: bytes) -> str | None:
    """'smime-opaque-signed', 'smime-encrypted' or None, by the CMS content type."""
    oid = content_type(der_of(data))
    if oid == SIGNED_DATA:
        return "smime-opaque-signed"
    if oid in (ENVELOPED_DATA, AUTH_ENVELOPED_DATA):
        return "smime-encrypted"
    return None


def inline_pgp(text: str | None) -> Literal["pgp-encrypted", "pgp-signed"] | None:
    """'pgp-encrypted' or 'pgp-signed' for an inline (non-MIME) PGP body."""
    m = _INLINE_PGP.search(text or "")
    if m is None:
        return None
    return "pgp-encrypted" if m.group(1) == "MESSAGE" else "pgp-signed"


def signers(data: bytes) -> list[str]:
    """Subjects (RFC 4514) of the certificates a CMS blob carries; [] when none or
    ``cryptography`` is missing. The certificates are the sender's claim."""
    try:
        from cryptography.hazmat.primitives.serialization import pkcs7
    except ImportError:
        return []
    try:
        with warnings.catch_warnings():  # "falling back to parsing as BER"
            warnings.simplefilter("ignore")
            certs = pkcs7.load_der_pkcs7_certificates(der_of(data))
    except Exception:
        return []
    return [c.subject.rfc4514_string() for c in certs][:10]
