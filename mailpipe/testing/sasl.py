"""Server side of the SASL mechanisms the fake POP3 server offers to AUTH (RFC 5034).

Written apart from the client's :mod:`mailpipe.plugins.pop3.auth`, so each checks the
other. A mechanism talks to the client only through ``challenge`` (send ``+ TEXT``,
return the answer, or None when the client cancelled with ``*``, which the session has
answered already) and ends in an :data:`Outcome` the session acts on. A malformed
response raises ``binascii.Error``, ``UnicodeDecodeError``, ``ValueError`` or
``KeyError``; the session answers it with ``-ERR``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

SUPPORTED_MECHANISMS = frozenset(
    {
        "PLAIN",
        "LOGIN",
        "CRAM-MD5",
        "SCRAM-SHA-1",
        "SCRAM-SHA-256",
        "XOAUTH2",
        "OAUTHBEARER",
    }
)

#: Sends ``+ TEXT`` and returns the client's answer; None if it cancelled.
Challenge = Callable[[str], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class Granted:
    """The client proved it is ``user``."""

    user: str


@dataclass(frozen=True, slots=True)
class Refused:
    """Authentication failed; ``reason`` is the ``-ERR`` text."""

    reason: str


#: What an exchange ends in; None: the client cancelled (already answered).
Outcome = Granted | Refused | None

_BAD_CREDENTIALS = "[AUTH] invalid user name or password"
_FAILED = "[AUTH] authentication failed"


def password_matches(users: Mapping[str, str], user: str, password: str) -> bool:
    """Whether ``password`` is ``user``'s (constant-time compare)."""
    expected = users.get(user)
    return expected is not None and hmac.compare_digest(expected, password)


@dataclass(slots=True)
class SaslServer:
    """One AUTH exchange against ``users`` (passwords) and ``oauth_tokens``.

    :param timestamp: the session's greeting timestamp, the CRAM-MD5 challenge.
    :param bad_scram_signature: send a wrong SCRAM server signature (a fault).
    """

    challenge: Challenge
    users: Mapping[str, str]
    oauth_tokens: Mapping[str, str]
    timestamp: str
    bad_scram_signature: bool = False

    async def authenticate(self, mechanism: str, initial: str | None) -> Outcome:
        """Run ``mechanism`` (one of :data:`SUPPORTED_MECHANISMS`) with the initial
        response ``initial`` (None when the client sent none)."""
        match mechanism:
            case "PLAIN":
                return await self._plain(initial)
            case "LOGIN":
                return await self._login(initial)
            case "CRAM-MD5":
                return await self._cram_md5(initial)
            case "SCRAM-SHA-1":
                return await self._scram(initial, "sha1")
            case "SCRAM-SHA-256":
                return await self._scram(initial, "sha256")
            case "XOAUTH2":
                return await self._xoauth2(initial)
            case "OAUTHBEARER":
                return await self._oauthbearer(initial)
        raise ValueError(f"unsupported mechanism {mechanism}")

    async def _response(self, initial: str | None, prompt: str = "") -> bytes | None:
        line = initial if initial is not None else await self.challenge(prompt)
        return None if line is None else base64.b64decode(line, validate=True)

    def _password(self, user: str, password: str) -> Outcome:
        if password_matches(self.users, user, password):
            return Granted(user)
        return Refused(_BAD_CREDENTIALS)

    async def _plain(self, initial: str | None) -> Outcome:
        raw = await self._response(initial)
        if raw is None:
            return None
        authzid, authcid, password = raw.decode().split("\0")  # RFC 4616 §2
        if authzid and authzid != authcid:
            return Refused("[AUTH] authorization identity not allowed")
        return self._password(authcid, password)

    async def _login(self, initial: str | None) -> Outcome:
        name = await self._response(initial, "VXNlcm5hbWU6")
        if name is None:
            return None
        password = await self._response(None, "UGFzc3dvcmQ6")
        if password is None:
            return None
        return self._password(name.decode(), password.decode())

    async def _cram_md5(self, initial: str | None) -> Outcome:
        if initial is not None:
            return Refused("[AUTH] CRAM-MD5 takes no initial response")
        raw = await self._response(
            None, base64.b64encode(self.timestamp.encode()).decode()
        )
        if raw is None:
            return None
        name, digest = raw.decode().rsplit(" ", 1)
        password = self.users.get(name)
        expected = hmac.new(
            (password or "").encode(), self.timestamp.encode(), hashlib.md5
        ).hexdigest()
        if password is not None and hmac.compare_digest(expected, digest):
            return Granted(name)
        return Refused(_FAILED)

    async def _scram(self, initial: str | None, digest: str) -> Outcome:
        # RFC 5802 §3, §5 (RFC 7677 for SHA-256), no channel binding.
        raw = await self._response(initial)
        if raw is None:
            return None
        cbflag, authzid, bare = raw.decode().split(",", 2)
        if cbflag != "n" or authzid:
            return Refused("[AUTH] only gs2 header 'n,,' is supported")
        fields = dict(kv.split("=", 1) for kv in bare.split(","))
        user = fields["n"].replace("=2C", ",").replace("=3D", "=")
        nonce = fields["r"] + secrets.token_urlsafe(12)
        salt, iterations = os.urandom(16), 4096
        first = f"r={nonce},s={base64.b64encode(salt).decode()},i={iterations}"
        final = await self._response(None, base64.b64encode(first.encode()).decode())
        if final is None:
            return None
        without_proof, _, proof = final.decode().rpartition(",p=")
        password = self.users.get(user)
        salted = hashlib.pbkdf2_hmac(
            digest, (password or "").encode(), salt, iterations
        )
        client_key = hmac.new(salted, b"Client Key", digest).digest()
        stored_key = hashlib.new(digest, client_key).digest()
        message = f"{bare},{first},{without_proof}".encode()
        signature = hmac.new(stored_key, message, digest).digest()
        sent_key = bytes(
            a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=False)
        )
        if (
            password is None
            or without_proof != f"c=biws,r={nonce}"
            or not hmac.compare_digest(
                hashlib.new(digest, sent_key).digest(), stored_key
            )
        ):
            return Refused(_FAILED)
        server_key = hmac.new(salted, b"Server Key", digest).digest()
        verifier = hmac.new(server_key, message, digest).digest()
        if self.bad_scram_signature:
            verifier = bytes(b ^ 0xFF for b in verifier)
        # RFC 4422 §5: the server signature goes in a final challenge, answered empty.
        final_data = b"v=" + base64.b64encode(verifier)
        if await self._response(None, base64.b64encode(final_data).decode()) is None:
            return None  # the client cancelled: it did not trust the signature
        return Granted(user)

    async def _bearer(self, user: str, token: str, error: dict[str, str]) -> Outcome:
        expected = self.oauth_tokens.get(user)
        if expected is not None and hmac.compare_digest(expected, token):
            return Granted(user)
        # RFC 7628 §3.2.3: failure is an error challenge; the client must answer it
        # (empty line for XOAUTH2, base64 of %x01 for OAUTHBEARER) before -ERR.
        answer = await self.challenge(
            base64.b64encode(json.dumps(error).encode()).decode()
        )
        return None if answer is None else Refused("[AUTH] invalid token")

    async def _xoauth2(self, initial: str | None) -> Outcome:
        raw = await self._response(initial)
        if raw is None:
            return None
        fields = dict(
            kv.split("=", 1) for kv in raw.decode().split("\x01") if "=" in kv
        )
        token = fields.get("auth", "").removeprefix("Bearer ")
        error = {
            "status": "401",
            "schemes": "bearer",
            "scope": "https://mail.google.com/",
        }
        return await self._bearer(fields.get("user", ""), token, error)

    async def _oauthbearer(self, initial: str | None) -> Outcome:
        raw = await self._response(initial)
        if raw is None:
            return None
        gs2, _, rest = raw.decode().partition("\x01")
        user = ""
        for part in gs2.split(","):
            if part.startswith("a="):
                user = part[2:].replace("=2C", ",").replace("=3D", "=")
        fields = dict(kv.split("=", 1) for kv in rest.split("\x01") if "=" in kv)
        token = fields.get("auth", "").removeprefix("Bearer ")
        return await self._bearer(user, token, {"status": "invalid_token", "scope": "mail"})
