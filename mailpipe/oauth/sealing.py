"""Encryption at rest of the token cache's secrets (Fernet: AES-128-CBC + HMAC-SHA256)."""

from __future__ import annotations

import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from mailpipe.errors import AuthenticationError


class SealError(AuthenticationError):
    """The cache key is malformed, or does not open what the cache holds.

    An authentication failure (long back-off, reported unhealthy): only a new key or
    a new ``mailpipe auth login`` helps, never a retry.
    """


def new_key() -> str:
    """A fresh random key for ``cache_key`` (url-safe base64, 32 bytes)."""
    return Fernet.generate_key().decode()


class Sealer:
    """Seals a JSON object into an opaque string and opens it again with one key.

    ``repr`` never shows the key.
    """

    __slots__ = ("_fernet",)

    def __init__(self, key: str) -> None:
        try:
            self._fernet = Fernet(key.strip().encode())
        except (ValueError, TypeError):
            raise SealError(
                "cache_key is not a Fernet key (32 url-safe base64-encoded bytes; "
                "make one with `mailpipe auth keygen`)"
            ) from None

    def seal(self, value: dict[str, Any]) -> str:
        """Encrypt and authenticate ``value``."""
        return self._fernet.encrypt(json.dumps(value).encode()).decode()

    def open(self, sealed: str) -> dict[str, Any]:
        """Decrypt ``sealed``; SealError when the key differs or it was altered."""
        try:
            data = json.loads(self._fernet.decrypt(sealed.encode()))
        except InvalidToken:
            raise SealError(
                "the token cache entry does not open with this cache_key (another key "
                "wrote it, or it was altered); run `mailpipe auth login` again"
            ) from None
        if not isinstance(data, dict):
            raise SealError("the token cache entry is not an object")
        return data

    def __repr__(self) -> str:
        return "Sealer(**********)"
