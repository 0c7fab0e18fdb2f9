"""SASL client mechanisms as challenge/response objects (no I/O), shared by every source.

PLAIN (RFC 4616), LOGIN, CRAM-MD5 (RFC 2195), SCRAM-SHA-1/SCRAM-SHA-256 (RFC 5802,
RFC 7677; SASLprep RFC 4013), XOAUTH2 (Google/Microsoft) and OAUTHBEARER (RFC 7628).
A driver calls ``initial()`` (sent with the command when the protocol allows an initial
response), then ``respond(challenge)`` for each decoded challenge, then ``success()``
on the server's OK. POP3 (RFC 5034) and IMAP (RFC 9051 §6.2.2, RFC 4959) frame the
same exchange differently; the framing lives in each plugin, the mechanisms here. The
conformance ids cited are the POP3 checklist's, where these rules were first written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import stringprep
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final


def b64encode(data: bytes) -> str:
    """Base64 without line breaks, as SASL lines carry it."""
    return base64.b64encode(data).decode("ascii")


def b64decode_strict(text: str) -> bytes | None:
    """Decode a server challenge strictly (C-39); None when it is not valid base64."""
    if not text:
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


class SaslCancel(Exception):
    """The mechanism cannot answer this challenge; the driver sends ``*`` (C-39)."""


class SaslVerifyError(SaslCancel):
    """The server failed the mechanism's own checks (SCRAM nonce or server signature).

    The driver cancels the exchange and reports an authentication failure whatever the
    server answers next: a server that cannot prove it knows the password is not trusted.
    """


@dataclass
class Mechanism:
    """A client SASL mechanism: ``initial()`` then ``respond(challenge)`` per challenge.

    ``challenge`` is the decoded challenge, or None when it was not base64 (C-40: fine
    for mechanisms that ignore it). ``error`` is set when the server sent an error
    challenge (XOAUTH2/OAUTHBEARER JSON) that was answered as the providers document.
    """

    name: str = ""
    error: dict[str, str] | None = field(default=None, init=False)

    def initial(self) -> bytes | None:
        """The initial response, or None when the mechanism has none."""
        return None

    def initial_sent(self) -> None:
        """Called when ``initial()`` went out with the AUTH command (C-37), so the next
        challenge is the mechanism's second step."""

    def respond(self, challenge: bytes | None) -> bytes:
        """The response to one server challenge (raises SaslCancel to cancel)."""
        raise SaslCancel(self.name)

    def success(self) -> None:
        """Called on ``+OK``; raises SaslVerifyError when the mechanism requires proof
        from the server that it has not had (SCRAM's server signature)."""


@dataclass
class Plain(Mechanism):
    """RFC 4616 §2: ``[authzid] NUL authcid NUL passwd``."""

    user: str = ""
    password: str = field(default="", repr=False)
    authzid: str = ""
    name: str = "PLAIN"

    def initial(self) -> bytes:
        return f"{self.authzid}\0{self.user}\0{self.password}".encode()

    def respond(self, challenge: bytes | None) -> bytes:
        # Sent without an initial response (C-36, C-37): the first challenge is empty.
        return self.initial()


@dataclass
class Login(Mechanism):
    """The LOGIN mechanism: user name, then password, whatever the prompts say."""

    user: str = ""
    password: str = field(default="", repr=False)
    name: str = "LOGIN"
    _step: int = field(default=0, init=False, repr=False)

    def respond(self, challenge: bytes | None) -> bytes:
        self._step += 1
        if self._step == 1:
            return self.user.encode()
        if self._step == 2:
            return self.password.encode()
        raise SaslCancel("LOGIN got a third challenge")


@dataclass
class CramMd5(Mechanism):
    """RFC 2195: ``user SP hex(HMAC-MD5(password, challenge))``; never chosen by itself."""

    user: str = ""
    password: str = field(default="", repr=False)
    name: str = "CRAM-MD5"

    def respond(self, challenge: bytes | None) -> bytes:
        if not challenge:
            raise SaslCancel("CRAM-MD5 needs a base64 challenge")
        digest = hmac.new(self.password.encode(), challenge, hashlib.md5).hexdigest()
        return f"{self.user} {digest}".encode()


#: S-12: a hostile server must not make PBKDF2 run for hours (i=2**31); real servers use
#: 4096 (RFC 5802 §5.1, RFC 7677 §4 minimum) to some tens of thousands.
MAX_SCRAM_ITERATIONS: Final = 1_000_000


_SCRAM_HASHES: Final = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}


def saslname(name: str) -> str:
    """RFC 5802 §5.1: ``=`` and ``,`` in a user name are sent as ``=3D`` and ``=2C``."""
    return name.replace("=", "=3D").replace(",", "=2C")


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep of a stored string (the password in RFC 5802 §2.2 Hi()).

    Raises ValueError for prohibited or unassigned characters and bad bidi text.
    """
    # RFC 4013 §2.1: non-ASCII spaces map to SPACE, "commonly mapped to nothing" go.
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in text
        if not stringprep.in_table_b1(ch)
    )
    out = unicodedata.normalize("NFKC", mapped)  # §2.2
    for ch in out:  # §2.3, §2.5
        if (
            stringprep.in_table_a1(ch)
            or stringprep.in_table_c12(ch)
            or stringprep.in_table_c21_c22(ch)
            or stringprep.in_table_c3(ch)
            or stringprep.in_table_c4(ch)
            or stringprep.in_table_c5(ch)
            or stringprep.in_table_c6(ch)
            or stringprep.in_table_c7(ch)
            or stringprep.in_table_c8(ch)
            or stringprep.in_table_c9(ch)
        ):
            raise ValueError("prohibited character in SASLprep input")
    rtl = any(stringprep.in_table_d1(ch) for ch in out)  # §2.4, RFC 3454 §6
    if rtl and (
        any(stringprep.in_table_d2(ch) for ch in out)
        or not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1]))
    ):
        raise ValueError("bad bidirectional text in SASLprep input")
    return out


def _attributes(message: bytes) -> list[tuple[str, str]]:
    # RFC 5802 §7: attr-val *("," attr-val), each a single letter, "=", a value.
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslVerifyError("SCRAM server message is not UTF-8") from None
    out = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise SaslVerifyError(f"malformed SCRAM attribute {part[:20]!r}")
        out.append((part[0], part[2:]))
    return out


class _SaltedPasswords:
    """RFC 5802 §3 ``Hi(Normalize(password), salt, i)``, the SaltedPassword, cached.

    Cached for the life of the process (RFC 5802 §5.1 allows a client to keep it):
    a poll that opens several sessions on one mailbox (commit windows) derives it
    once for the server's salt and iteration count, not once per login, and so does
    a worker polling its mailboxes again and again, each with a salt of its own, on
    a server that keeps each user's salt (stored SCRAM secrets; a server that derives
    them from a stored plaintext password, as Dovecot does, sends a new salt at every
    login, and nothing can be kept). At most ``maxsize`` entries (least recently used
    first out): enough for every mailbox of a worker that polls thousands (issue 18:
    with 16, a worker of more than 16 such mailboxes ran PBKDF2, ~1.2 ms at 4,096
    iterations, at every login of every cycle; bench/RESULTS.md §45). An entry takes
    0.35-0.4 KiB (about 1.5 MiB full). The cache is keyed by an
    HMAC of the password under a random key of this process, never the password
    itself, so no plaintext password is kept by it; the value is as secret as the
    password it is derived from and never leaves the process.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[tuple[str, bytes, bytes, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, digest: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        key = (digest, hmac.new(self._key, password, "sha256").digest(), salt, iterations)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        value = hashlib.pbkdf2_hmac(digest, password, salt, iterations)
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return value

    def cache_clear(self) -> None:
        """Forget every cached value."""
        with self._lock:
            self._entries.clear()


salted_password: Final = _SaltedPasswords(maxsize=4096)


@dataclass
class Scram(Mechanism):
    """RFC 5802 SCRAM (SHA-1) and RFC 7677 SCRAM-SHA-256, without channel binding.

    The gs2 header is ``n,,`` (no channel binding, no authzid). Steps: ``initial()`` is
    the client-first message; the first challenge (server-first) gets client-final with
    the proof; the second (server-final) must carry ``v=`` with the server signature,
    checked in constant time. ``+OK`` before that signature is a failure
    (:meth:`success`), so a server that does not know the password never passes.
    ``nonce`` fixes the client nonce (tests only); by default 24 random characters.
    """

    user: str = ""
    password: str = field(default="", repr=False)
    name: str = "SCRAM-SHA-256"
    nonce: str = field(default="", repr=False)
    _bare: str = field(default="", init=False, repr=False)
    _auth_message: bytes = field(default=b"", init=False, repr=False)
    _server_key: bytes = field(default=b"", init=False, repr=False)
    _step: int = field(default=0, init=False, repr=False)
    verified: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.name not in _SCRAM_HASHES:
            raise ValueError(f"unknown SCRAM variant {self.name!r}")

    @property
    def _hash(self) -> str:
        return _SCRAM_HASHES[self.name]

    def initial(self) -> bytes:
        if not self._bare:
            # RFC 5802 §7: nonce = printable ASCII except ","; token_urlsafe has none.
            self.nonce = self.nonce or secrets.token_urlsafe(18)
            self._bare = f"n={saslname(self.user)},r={self.nonce}"
        return f"n,,{self._bare}".encode()

    def initial_sent(self) -> None:
        self._step = 1

    def respond(self, challenge: bytes | None) -> bytes:
        if self._step == 0:
            if challenge:
                raise SaslCancel("SCRAM expects an empty first challenge")
            self._step = 1
            return self.initial()  # C-36/C-37: sent without an initial response
        if challenge is None:
            raise SaslCancel("SCRAM challenge is not base64")  # C-39
        if self._step == 1:
            self._step = 2
            return self._client_final(challenge)
        if self._step == 2:
            self._step = 3
            self._check_server_final(challenge)
            return b""  # RFC 4422 §5: additional data with success, answered empty
        raise SaslCancel("SCRAM got a challenge after the server signature")

    def _client_final(self, server_first: bytes) -> bytes:
        attrs = _attributes(server_first)
        if attrs and attrs[0][0] == "m":
            raise SaslVerifyError("SCRAM server requires an unsupported extension")
        values = dict(attrs)
        if [k for k, _ in attrs[:3]] != ["r", "s", "i"]:
            raise SaslVerifyError("SCRAM server-first message lacks r=, s=, i=")
        nonce, iterations = values["r"], values["i"]
        # RFC 5802 §5.1: the combined nonce starts with ours and adds the server's part.
        if not nonce.startswith(self.nonce) or len(nonce) == len(self.nonce):
            raise SaslVerifyError("SCRAM server nonce does not extend the client nonce")
        salt = b64decode_strict(values["s"])
        if not salt:
            raise SaslVerifyError("SCRAM salt is missing or not base64")
        if not (iterations.isascii() and iterations.isdigit()) or not (
            0 < int(iterations) <= MAX_SCRAM_ITERATIONS
        ):
            raise SaslVerifyError(f"SCRAM iteration count {iterations[:12]!r} refused")
        try:
            password = saslprep(self.password)
        except ValueError:
            password = self.password  # as PostgreSQL's libpq: use the raw password
        digest = self._hash
        salted = salted_password(digest, password.encode(), salt, int(iterations))
        client_key = hmac.new(salted, b"Client Key", digest).digest()
        stored_key = hashlib.new(digest, client_key).digest()
        without_proof = f"c=biws,r={nonce}"  # biws = base64("n,,")
        self._auth_message = ",".join(
            [self._bare, server_first.decode(), without_proof]
        ).encode()
        signature = hmac.new(stored_key, self._auth_message, digest).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_key = hmac.new(salted, b"Server Key", digest).digest()
        return f"{without_proof},p={b64encode(proof)}".encode()

    def _check_server_final(self, server_final: bytes) -> None:
        values = dict(_attributes(server_final))
        if "e" in values:
            self.error = {"e": values["e"][:100]}  # RFC 5802 §7 server-error
            raise SaslVerifyError(f"SCRAM server error {values['e'][:100]!r}")
        expected = hmac.new(self._server_key, self._auth_message, self._hash).digest()
        got = b64decode_strict(values.get("v", ""))
        if got is None or not hmac.compare_digest(got, expected):
            raise SaslVerifyError("SCRAM server signature does not match")
        self.verified = True

    def success(self) -> None:
        if not self.verified:
            raise SaslVerifyError(
                "server accepted SCRAM without proving it knows the password "
                "(no server signature)"
            )


def _error_challenge(challenge: bytes | None) -> dict[str, str]:
    try:
        data = json.loads(challenge or b"")
    except ValueError:
        return {"status": "unknown"}
    if not isinstance(data, dict):
        return {"status": "unknown"}
    return {k: str(v) for k, v in data.items() if k in ("status", "schemes", "scope")}


@dataclass
class XOAuth2(Mechanism):
    """XOAUTH2 (Google and Microsoft docs), always in the two-line form (C-43).

    The first (empty) challenge gets the token; a second challenge is the base64 JSON
    error (C-44), answered with an empty line so the server fails the command. The token
    must carry the provider's POP scope (C-46; README lists Gmail's and Microsoft's).
    """

    user: str = ""
    token: str = field(default="", repr=False)
    name: str = "XOAUTH2"
    _sent: bool = field(default=False, init=False, repr=False)

    def initial(self) -> bytes:
        return f"user={self.user}\x01auth=Bearer {self.token}\x01\x01".encode()

    def initial_sent(self) -> None:
        self._sent = True

    def respond(self, challenge: bytes | None) -> bytes:
        if not self._sent:
            self._sent = True
            return self.initial()
        self.error = _error_challenge(challenge)
        return b""


@dataclass
class OAuthBearer(Mechanism):
    """RFC 7628 §3.1 OAUTHBEARER; an error challenge is answered with ``AQ==`` (§3.2.3)."""

    user: str = ""
    token: str = field(default="", repr=False)
    host: str = ""
    port: int = 0
    name: str = "OAUTHBEARER"
    _sent: bool = field(default=False, init=False, repr=False)

    def initial(self) -> bytes:
        return (
            f"n,a={self.user},\x01host={self.host}\x01port={self.port}"
            f"\x01auth=Bearer {self.token}\x01\x01"
        ).encode()

    def initial_sent(self) -> None:
        self._sent = True

    def respond(self, challenge: bytes | None) -> bytes:
        if not self._sent and not challenge:
            self._sent = True
            return self.initial()
        self._sent = True
        self.error = _error_challenge(challenge)
        return b"\x01"
