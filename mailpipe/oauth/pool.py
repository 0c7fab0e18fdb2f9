"""One token cache per (journal, cache_key) and one broker per mailbox, shared within
a process.

Mailboxes of one ``[state]`` journal may each have their own ``cache_key`` (``mailpipe
auth login`` seals each mailbox's tokens with its own key), so a cache, whose sealer
holds one key, is shared only by the mailboxes whose keys are equal.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mailpipe.oauth.broker import TokenBroker
from mailpipe.oauth.cache import TokenCache
from mailpipe.oauth.options import AnyOAuth
from mailpipe.oauth.scopes import Protocol
from mailpipe.oauth.sealing import Sealer

_LOCK = threading.Lock()
_CACHES: dict[tuple[str, str, str], TokenCache] = {}
_BROKERS: dict[tuple[str, str, str], TokenBroker] = {}
DEFAULT_STATE = "var/mailpipe.sqlite3"
#: The clock of the caches and brokers made here (tests replace it).
CLOCK: Callable[[], float] = time.time


def cache_for(options: AnyOAuth) -> TokenCache:
    """The token cache in the journal of the config ``options`` came from, sealing
    with ``options.cache_key``."""
    state = options.state_path or DEFAULT_STATE
    secret = options.cache_key.get()
    # The key's digest, not the key, names the cache: the dict holds no secret.
    digest = hashlib.sha256(secret.strip().encode()).hexdigest()
    key = (str(options.base_dir), state, digest)
    with _LOCK:
        cache = _CACHES.get(key)
        if cache is None:
            cache = TokenCache(
                state,
                base_dir=Path(options.base_dir),
                sealer=Sealer(secret),
                clock=lambda: CLOCK(),
            )
            _CACHES[key] = cache
        return cache


def broker_for(
    options: AnyOAuth, *, protocol: Protocol, username: str, mailbox: str
) -> TokenBroker:
    """The broker of ``mailbox`` (made on first use, then reused)."""
    key = (mailbox, options.account_key(protocol, username), str(options.base_dir))
    with _LOCK:
        broker = _BROKERS.get(key)
    if broker is None:
        broker = TokenBroker(
            options,
            protocol=protocol,
            username=username,
            cache=cache_for(options),
            mailbox=mailbox,
            clock=lambda: CLOCK(),
        )
        with _LOCK:
            broker = _BROKERS.setdefault(key, broker)
    return broker


def close_all() -> None:
    """Close every cache and forget every broker (tests, shutdown)."""
    with _LOCK:
        caches = list(_CACHES.values())
        _CACHES.clear()
        _BROKERS.clear()
    for cache in caches:
        cache.close()
