"""The token cache in the journal's database, shared by every worker that uses it.

One row per account (:meth:`mailpipe.oauth.options._Common.account_key`). The access
and refresh tokens are sealed with the ``cache_key`` (:mod:`mailpipe.oauth.sealing`);
everything else in the row is plain so that ``mailpipe auth status`` can show it
without the key. A SQLite journal file and its WAL files are made 0600.

The refresh lease is one conditional UPDATE (atomic on SQLite and PostgreSQL alike):
it succeeds only when no other owner holds an unexpired lease, so exactly one worker
refreshes an account at a time; the others keep using the still-valid token or wait.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailpipe.journal import open_journal
from mailpipe.journal.errors import JournalError
from mailpipe.oauth.sealing import Sealer
from mailpipe.secrets import MASK, forget_secret, remember_secret
from mailpipe.storable import storable

# The table's ``description`` column (migration 3) is neither read nor written: `auth
# status` describes an account from the config. It keeps its default '{}'.
_COLUMNS = (
    "account, sealed, expires_at, refresh_at, rt_issued_at, "
    "last_refresh, refreshes, last_error, last_error_code, last_error_at, "
    "lease_owner, lease_until"
)


@dataclass(slots=True, kw_only=True)
class CachedToken:
    """One cache row; ``access_token``/``refresh_token`` are set only when opened."""

    account: str
    sealed: str = ""
    access_token: str = field(default="", repr=False)
    refresh_token: str = field(default="", repr=False)
    expires_at: float | None = None
    refresh_at: float | None = None
    rt_issued_at: float | None = None
    last_refresh: float | None = None
    refreshes: int = 0
    last_error: str = ""
    last_error_code: str = ""
    last_error_at: float | None = None
    lease_owner: str | None = None
    lease_until: float | None = None

    def __repr__(self) -> str:
        return (
            f"CachedToken(account={self.account!r}, expires_at={self.expires_at!r}, "
            f"access_token={MASK if self.access_token else ''!r})"
        )


@dataclass(slots=True)
class _Result:
    """What a statement returned, read while the connection lock was held."""

    rows: list[Any] | None
    rowcount: int

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return list(self.rows or [])


def _row(row: tuple[Any, ...]) -> CachedToken:
    return CachedToken(
        account=row[0],
        sealed=row[1] or "",
        expires_at=row[2],
        refresh_at=row[3],
        rt_issued_at=row[4],
        last_refresh=row[5],
        refreshes=int(row[6] or 0),
        last_error=row[7] or "",
        last_error_code=row[8] or "",
        last_error_at=row[9],
        lease_owner=row[10],
        lease_until=row[11],
    )


class TokenCache:
    """The ``oauth_tokens`` table of the journal named by ``[state] path``.

    ``sealer`` may be None for read-only uses that never open secrets (``auth
    status``). ``clock`` returns Unix time (tests move it).
    """

    def __init__(
        self,
        url_or_path: str,
        *,
        base_dir: Path,
        sealer: Sealer | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sealer = sealer
        self.clock = clock
        self._lock = threading.Lock()
        # Opening the journal applies its migrations (the table is migration 3).
        journal = open_journal(url_or_path, base_dir=base_dir)
        self._journal = journal
        self._param = "?"
        self._table = "oauth_tokens"
        self._conn: Any
        # The token pair of each account last remembered for redaction (see _track).
        self._remembered: dict[str, frozenset[str]] = {}
        path = getattr(journal, "path", None)
        if path is not None and str(path) != ":memory:":
            journal.close()
            self._conn = sqlite3.connect(
                str(path), timeout=30.0, isolation_level=None, check_same_thread=False
            )
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(f"{path}{suffix}", 0o600)
        elif path is not None:
            raise JournalError("the OAuth token cache needs a journal file, not :memory:")
        else:
            self._conn = journal._connect()  # type: ignore[attr-defined]
            self._param = "%s"
            self._table = "mailpipe_oauth_tokens"

    def _sql(self, text: str) -> str:
        return text.replace("{t}", self._table).replace("?", self._param)

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise JournalError(f"token cache: {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("psycopg"):
                raise JournalError(f"token cache: {exc}") from exc
            raise

    def _execute(self, text: str, params: tuple[Any, ...] = ()) -> Any:
        # One connection serves every broker thread of the process: one at a time.
        with self._lock, self._translate():
            try:
                return self._run(text, params)
            except Exception as exc:
                # PostgreSQL restarted or the backend was terminated: every statement
                # here is one autocommit transaction, so reopen and run it once more
                # (as the journal does) instead of failing every later poll.
                if self._param != "%s" or not (self._conn.broken or self._conn.closed):
                    raise
                if not type(exc).__module__.startswith("psycopg"):
                    raise
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = self._journal._connect()  # type: ignore[attr-defined]
                return self._run(text, params)

    def _run(self, text: str, params: tuple[Any, ...]) -> _Result:
        cur = self._conn.execute(self._sql(text), params)
        rows = cur.fetchall() if cur.description is not None else None
        return _Result(rows, int(cur.rowcount))

    def load(self, account: str, *, open_secrets: bool = True) -> CachedToken | None:
        """The row of ``account`` (its tokens opened unless ``open_secrets`` is False)."""
        row = self._execute(
            f"SELECT {_COLUMNS} FROM {{t}} WHERE account = ?", (account,)
        ).fetchone()
        if row is None:
            return None
        entry = _row(tuple(row))
        if open_secrets and entry.sealed and self.sealer is not None:
            secrets = self.sealer.open(entry.sealed)
            entry.access_token = str(secrets.get("access_token", ""))
            entry.refresh_token = str(secrets.get("refresh_token", ""))
            self._track(account, entry.access_token, entry.refresh_token)
        return entry

    def _track(self, account: str, *tokens: str) -> None:
        """Mask ``tokens`` in every log line and error, and stop masking the pair
        they replace: only the current pair of each account stays in the process-wide
        redaction set, so it does not grow (and slow every log line) per refresh."""
        current = frozenset(t for t in tokens if t)
        with self._lock:
            previous = self._remembered.get(account, frozenset())
            self._remembered[account] = current
        for value in current - previous:
            remember_secret(value)
        for value in previous - current:
            forget_secret(value)

    def _ensure(self, account: str) -> None:
        self._execute(
            "INSERT INTO {t} (account) VALUES (?) ON CONFLICT (account) DO NOTHING",
            (account,),
        )

    def take_lease(self, account: str, *, owner: str, ttl: float) -> bool:
        """Take the refresh lease of ``account`` for ``ttl`` seconds; False when another
        owner holds an unexpired one. One statement, so two workers cannot both win."""
        self._ensure(account)
        now = self.clock()
        cur = self._execute(
            "UPDATE {t} SET lease_owner = ?, lease_until = ? WHERE account = ? AND "
            "(lease_owner IS NULL OR lease_until < ? OR lease_owner = ?)",
            (owner, now + ttl, account, now, owner),
        )
        return int(cur.rowcount) == 1

    def release_lease(self, account: str, *, owner: str) -> None:
        """Give the lease back if ``owner`` holds it."""
        self._execute(
            "UPDATE {t} SET lease_owner = NULL, lease_until = NULL "
            "WHERE account = ? AND lease_owner = ?",
            (account, owner),
        )

    def store(
        self,
        account: str,
        *,
        access_token: str,
        refresh_token: str,
        expires_at: float,
        refresh_at: float,
        rt_issued_at: float | None,
    ) -> None:
        """Save freshly issued tokens and clear the last error."""
        if self.sealer is None:
            raise JournalError("token cache opened without a cache_key")
        sealed = self.sealer.seal(
            {"access_token": access_token, "refresh_token": refresh_token}
        )
        self._track(account, access_token, refresh_token)
        self._ensure(account)
        self._execute(
            "UPDATE {t} SET sealed = ?, expires_at = ?, "
            "refresh_at = ?, rt_issued_at = ?, last_refresh = ?, "
            "refreshes = refreshes + 1, last_error = '', last_error_code = '', "
            "last_error_at = NULL WHERE account = ?",
            (
                sealed,
                expires_at,
                refresh_at,
                rt_issued_at,
                self.clock(),
                account,
            ),
        )

    def expire(self, account: str, access_token: str) -> None:
        """Mark ``access_token`` as due for refresh (a server refused it early)."""
        entry = self.load(account)
        if entry is None or entry.access_token != access_token:
            return  # already replaced by another worker
        self._execute(
            "UPDATE {t} SET refresh_at = ? WHERE account = ?", (0.0, account)
        )

    def record_error(
        self, account: str, *, code: str, message: str, rt_issued_at: float | None
    ) -> bool:
        """Remember the latest failure (``mailpipe auth status`` shows it), unless the
        refresh token was replaced meanwhile: ``rt_issued_at`` is the one the failed
        request used, and an error about an older grant must not mark a fresh login
        dead. True when recorded."""
        self._ensure(account)
        same = "rt_issued_at IS NULL" if rt_issued_at is None else "rt_issued_at = ?"
        # The endpoint's words: stored as the ledger stores its texts (mailpipe.storable;
        # PostgreSQL refuses a NUL, neither journal encodes a lone surrogate).
        params: tuple[Any, ...] = (
            storable(message[:500]), storable(code), self.clock(), account,
        )
        if rt_issued_at is not None:
            params += (rt_issued_at,)
        cur = self._execute(
            "UPDATE {t} SET last_error = ?, last_error_code = ?, last_error_at = ? "
            f"WHERE account = ? AND {same}",
            params,
        )
        return int(cur.rowcount) == 1

    def forget(self, account: str) -> bool:
        """Delete the row of ``account`` (``mailpipe auth revoke``)."""
        cur = self._execute("DELETE FROM {t} WHERE account = ?", (account,))
        return int(cur.rowcount) > 0

    def close(self) -> None:
        """Close the connection (and the PostgreSQL journal behind it)."""
        with contextlib.suppress(Exception):
            self._conn.close()
        if self._param == "%s":
            self._journal.close()

    def __enter__(self) -> TokenCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
