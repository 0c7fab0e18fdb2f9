"""The broker and the shared cache: refresh rarely, once across workers, sealed at rest."""

import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mailpipe.errors import AuthenticationError
from mailpipe.oauth import gauges, pool
from mailpipe.oauth.broker import REFUSAL_GRACE, TokenBroker
from mailpipe.oauth.cache import CachedToken, TokenCache
from mailpipe.oauth.errors import GrantRevoked, NoRefreshToken, TokenEndpointBusy
from mailpipe.oauth.gauges import BOARD, OAuthMetrics
from mailpipe.oauth.grant import Grant
from mailpipe.oauth.options import AnyOAuth
from mailpipe.oauth.sealing import Sealer, SealError, new_key
from mailpipe.secrets import MASK, known_secret_values, redact
from mailpipe.testing.authserver import AuthServer

from .conftest import Clock, oauth


def _options(server: AuthServer, key: str, **extra: Any) -> AnyOAuth:
    table = {
        "provider": "oidc", "flow": "refresh_token", "client_id": "pub",
        "issuer": server.url, "cache_key": key, "ca_file": str(server.ca_file),
        "refresh_margin": "300s", "refresh_jitter": "60s",
    }
    table.update(extra)
    return oauth(table)


def _cache(path: str, key: str, clock: Clock, tmp_path: Path) -> TokenCache:
    return TokenCache(path, base_dir=tmp_path, sealer=Sealer(key), clock=clock)


def _broker(
    options: AnyOAuth, cache: TokenCache, clock: Clock, *, mailbox: str = "mb",
    username: str = "alice", rng: float = 0.5,
) -> TokenBroker:
    return TokenBroker(
        options, protocol="pop3", username=username, cache=cache, mailbox=mailbox,
        clock=clock, rng=lambda: rng,
    )


def _login(broker: TokenBroker, server: AuthServer, user: str = "alice") -> None:
    """What `mailpipe auth login` leaves in the cache: a refresh token."""
    rt = server.issue_refresh_token(user, "pub")
    broker.save(Grant(access_token="", expires_in=0, refresh_token=rt), previous=None)


def _logged_in(
    server: AuthServer, key: str, clock: Clock, tmp_path: Path
) -> tuple[TokenCache, TokenBroker]:
    """A cache in ``tmp_path/j.sqlite3`` and a broker of alice, logged in."""
    cache = _cache(str(tmp_path / "j.sqlite3"), key, clock, tmp_path)
    broker = _broker(_options(server, key), cache, clock)
    _login(broker, server)
    return cache, broker


def test_token_is_reused_until_refresh_time_then_refreshed_once(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    cache, broker = _logged_in(auth_server, cache_key, clock, tmp_path)
    first = broker.token_sync()
    for _ in range(5):  # polls: no request
        assert broker.token_sync() == first
    assert len(auth_server.grants()) == 1
    entry = cache.load(broker.account)
    assert entry is not None and entry.expires_at is not None
    # refresh_at = expiry - margin - rng * jitter (0.5 * 60 s)
    assert entry.refresh_at == entry.expires_at - 300 - 30
    clock.advance(3600 - 331)
    assert broker.token_sync() == first
    clock.advance(2)  # past refresh_at, still before expiry
    second = broker.token_sync()
    assert second != first and auth_server.introspect(second)["active"]
    assert len(auth_server.grants()) == 2


def test_cache_is_sealed_and_private(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    path = tmp_path / "j.sqlite3"
    cache = _cache(str(path), cache_key, clock, tmp_path)
    broker = _broker(_options(auth_server, cache_key), cache, clock)
    _login(broker, auth_server)
    token = broker.token_sync()
    entry = cache.load(broker.account)
    assert entry is not None and entry.refresh_token.startswith("rt-")
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("j.sqlite3*"))
    assert token.encode() not in raw and entry.refresh_token.encode() not in raw
    for p in tmp_path.glob("j.sqlite3*"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert token not in repr(entry)
    from mailpipe.secrets import redact

    line = f"refused token={token} rt={entry.refresh_token}"
    assert token not in redact(line) and entry.refresh_token not in redact(line)
    other = TokenCache(str(path), base_dir=tmp_path, sealer=Sealer(new_key()))
    with pytest.raises(SealError, match="does not open with this cache_key"):
        other.load(broker.account)


def test_a_malformed_cache_key_is_a_clear_error() -> None:
    with pytest.raises(SealError, match="not a Fernet key"):
        Sealer("not-a-key")


def test_no_refresh_token_before_login(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    cache = _cache(str(tmp_path / "j.sqlite3"), cache_key, clock, tmp_path)
    broker = _broker(_options(auth_server, cache_key), cache, clock)
    with pytest.raises(NoRefreshToken, match="mailpipe auth login"):
        broker.token_sync()
    assert not auth_server.token_requests
    assert gauges.revoked() == {"mb": "no_refresh_token"}


def test_revoked_grant_is_not_retried_until_a_new_login(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache, broker = _logged_in(auth_server, cache_key, clock, tmp_path)
    broker.token_sync()
    auth_server.revoke_user("alice")
    clock.advance(3600)
    with pytest.raises(GrantRevoked) as caught:
        broker.token_sync()
    assert caught.value.code == "invalid_grant"
    requests = len(auth_server.token_requests)
    for _ in range(3):  # later polls: no request, the same classified error
        with pytest.raises(GrantRevoked):
            broker.token_sync()
    assert len(auth_server.token_requests) == requests
    assert gauges.BOARD.outcomes[("mb", "failure", "invalid_grant")] == 1  # one asked
    entry = cache.load(broker.account)
    assert entry is not None and entry.last_error_code == "invalid_grant"
    assert gauges.revoked() == {"mb": "invalid_grant"}
    _login(broker, auth_server)  # the operator logs in again
    assert auth_server.introspect(broker.token_sync())["active"]
    assert gauges.revoked() == {}


def test_busy_endpoint_is_temporary_and_recorded(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    cache, broker = _logged_in(auth_server, cache_key, clock, tmp_path)
    auth_server.fail_next("429")
    with pytest.raises(TokenEndpointBusy):
        broker.token_sync()
    entry = cache.load(broker.account)
    assert entry is not None and entry.last_error_code == "temporarily_unavailable"
    assert gauges.revoked() == {}
    assert broker.token_sync()  # the next poll succeeds
    assert cache.load(broker.account).last_error == ""  # type: ignore[union-attr]


def test_one_entry_serves_every_mailbox_of_an_app(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    options = _options(auth_server, cache_key, flow="client_credentials",
                       client_id="app", client_secret="app-secret")
    cache = _cache(str(tmp_path / "j.sqlite3"), cache_key, clock, tmp_path)
    a = _broker(options, cache, clock, mailbox="sales", username="sales@example.com")
    b = _broker(options, cache, clock, mailbox="support", username="help@example.com")
    assert a.account == b.account
    assert a.token_sync() == b.token_sync()
    assert len(auth_server.grants()) == 1
    delegated = _options(auth_server, cache_key)
    assert delegated.account_key("pop3", "x@example.com") != delegated.account_key(
        "pop3", "y@example.com"
    )


def _race(
    auth_server: AuthServer, key: str, clock: Clock, tmp_path: Path, url: str
) -> list[str]:
    """Two workers (own connections, own owners) want a token at the same moment."""
    options = _options(auth_server, key)
    caches = [_cache(url, key, clock, tmp_path) for _ in range(2)]
    brokers = [_broker(options, c, clock, mailbox=f"w{i}") for i, c in enumerate(caches)]
    _login(brokers[0], auth_server)
    auth_server.slow_seconds = 1.0
    auth_server.fail_next("slow")  # the winner's request takes a while
    barrier = threading.Barrier(2)
    got: list[str] = []

    def work(broker: TokenBroker) -> None:
        barrier.wait()
        got.append(broker.token_sync())

    threads = [threading.Thread(target=work, args=(b,)) for b in brokers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for c in caches:
        c.close()
    return got


def test_two_workers_sqlite_refresh_once(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    got = _race(auth_server, cache_key, clock, tmp_path, str(tmp_path / "j.sqlite3"))
    assert len(got) == 2 and got[0] == got[1]
    assert len(auth_server.grants("refresh_token")) == 1
    assert len(auth_server.token_requests) == 1


def test_two_workers_postgres_refresh_once(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path,
    pg_schema_url: str,
) -> None:
    got = _race(auth_server, cache_key, clock, tmp_path, pg_schema_url)
    assert len(got) == 2 and got[0] == got[1]
    assert len(auth_server.token_requests) == 1


def test_lease_is_exclusive_until_it_expires(
    cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    path = str(tmp_path / "j.sqlite3")
    a, b = (_cache(path, cache_key, clock, tmp_path) for _ in range(2))
    assert a.take_lease("acct", owner="a", ttl=30)
    assert not b.take_lease("acct", owner="b", ttl=30)
    clock.advance(31)  # a died holding it
    assert b.take_lease("acct", owner="b", ttl=30)
    b.release_lease("acct", owner="b")
    assert a.take_lease("acct", owner="a", ttl=30)


def test_metrics_show_expiry_outcomes_and_refresh_token_risk(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    cache = _cache(str(tmp_path / "j.sqlite3"), cache_key, clock, tmp_path)
    broker = _broker(_options(auth_server, cache_key, refresh_token_max_age="10d"),
                     cache, clock)
    _login(broker, auth_server)
    broker.token_sync()
    auth_server.fail_next("429")
    clock.advance(3600)
    with pytest.raises(TokenEndpointBusy):
        broker.token_sync()
    families = {f.name: f for f in OAuthMetrics(clock).collect()}
    expiry = families["mailpipe_oauth_token_expiry_timestamp_seconds"].samples
    assert [(s.labels["mailbox"], s.value) for s in expiry] == [("mb", clock.now)]
    outcomes = {
        (s.labels["outcome"], s.labels["reason"]): s.value
        for s in families["mailpipe_oauth_refreshes"].samples
        if s.name.endswith("_total")
    }
    assert outcomes == {("success", ""): 2, ("failure", "temporarily_unavailable"): 1}
    (risk,) = families["mailpipe_oauth_refresh_token_at_risk_seconds"].samples
    assert risk.value == 10 * 86400 - 3600


def test_an_unusable_sqlite_file_is_a_journal_error(
    cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    path = tmp_path / "j.sqlite3"
    _cache(str(path), cache_key, clock, tmp_path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE oauth_tokens")
    conn.close()
    from mailpipe.journal.errors import JournalError

    with pytest.raises(JournalError, match="token cache"):
        _cache(str(path), cache_key, clock, tmp_path).load("x")


def test_redaction_set_keeps_only_the_current_tokens(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    # Review H1: each refreshed pair was remembered for the process's life.
    _, broker = _logged_in(auth_server, cache_key, clock, tmp_path)
    before = len(known_secret_values())
    tokens = []
    for _ in range(300):  # 300 hourly refreshes: 12.5 days of one mailbox
        tokens.append(broker.token_sync())
        clock.advance(3600)
    current = broker.token_sync()
    assert len(set(tokens)) == 300
    assert len(known_secret_values()) - before <= 2
    assert current in known_secret_values() and tokens[0] not in known_secret_values()
    assert redact(f"token={current}") == f"token={MASK}"


def test_postgres_cache_reconnects_after_its_backend_is_gone(
    auth_server: AuthServer, pg_schema_url: str, cache_key: str, clock: Clock,
    tmp_path: Path,
) -> None:
    # Review H2: one raw connection, never reopened; every later load() failed.
    import psycopg

    from tests.conftest import POSTGRES_DSN

    cache = _cache(pg_schema_url, cache_key, clock, tmp_path)
    broker = _broker(_options(auth_server, cache_key), cache, clock)
    _login(broker, auth_server)
    token = broker.token_sync()
    for _ in range(2):  # the first reconnect and a second one
        pid = cache._conn.info.backend_pid
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        entry = cache.load(broker.account)
        assert entry is not None and entry.access_token == token
        assert cache._conn.info.backend_pid != pid
    cache.close()


def test_a_failed_early_refresh_keeps_serving_the_valid_token(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    # Review M1: a 429 between refresh_at and expires_at failed the poll.
    cache, broker = _logged_in(auth_server, cache_key, clock, tmp_path)
    first = broker.token_sync()
    clock.advance(3600 - 320)  # past refresh_at (expiry - 330 s), 320 s still valid
    auth_server.fail_next("429")
    with capture_logs() as logs:
        assert broker.token_sync() == first
    assert [e["event"] for e in logs] == ["oauth_refresh_failed"]
    assert logs[0]["log_level"] == "warning" and logs[0]["kept_valid_token"] is True
    assert BOARD.outcomes[("mb", "failure", "temporarily_unavailable")] == 1
    entry = cache.load(broker.account)
    assert entry is not None and entry.last_error_code == "temporarily_unavailable"
    second = broker.token_sync()  # the next poll refreshes
    assert second != first and len(auth_server.grants()) == 2
    clock.advance(3600)  # past expiry: a failure now fails the poll
    auth_server.fail_next("429")
    with pytest.raises(TokenEndpointBusy):
        broker.token_sync()


def test_two_mailboxes_with_their_own_cache_keys_share_one_journal(
    auth_server: AuthServer, clock: Clock, tmp_path: Path
) -> None:
    # Review M2: the pool sealed every mailbox with the first mailbox's key.
    state = tmp_path / "j.sqlite3"
    key_a, key_b = new_key(), new_key()
    table = {
        "provider": "oidc", "flow": "refresh_token", "client_id": "pub",
        "issuer": auth_server.url, "ca_file": str(auth_server.ca_file),
    }
    a = oauth({**table, "cache_key": key_a}, state=state, base_dir=tmp_path)
    b = oauth({**table, "cache_key": key_b}, state=state, base_dir=tmp_path)
    pool.CLOCK = clock
    for options, user, key in ((a, "alice", key_a), (b, "bob", key_b)):
        # what `mailpipe auth login CONFIG MAILBOX` stores: sealed with its own key
        with TokenCache(str(state), base_dir=tmp_path, sealer=Sealer(key)) as cli:
            TokenBroker(options, protocol="pop3", username=user, cache=cli).save(
                Grant(access_token="", expires_in=0,
                      refresh_token=auth_server.issue_refresh_token(user, "pub")),
                previous=None,
            )
    broker_a = pool.broker_for(a, protocol="pop3", username="alice", mailbox="a")
    broker_b = pool.broker_for(b, protocol="pop3", username="bob", mailbox="b")
    assert auth_server.introspect(broker_a.token_sync())["active"]
    assert auth_server.introspect(broker_b.token_sync())["active"]
    assert broker_a.cache is not broker_b.cache
    assert pool.cache_for(a) is broker_a.cache  # still one cache per (journal, key)


def test_a_cache_key_that_does_not_open_the_entry_is_an_authentication_error(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    # Review M2: SealError backed off like a network error and kept /healthz green.
    path = str(tmp_path / "j.sqlite3")
    _login(_broker(_options(auth_server, cache_key), _cache(path, cache_key, clock,
                                                            tmp_path), clock),
           auth_server)
    other = new_key()
    broker = _broker(_options(auth_server, other), _cache(path, other, clock, tmp_path),
                     clock)
    with pytest.raises(AuthenticationError, match="does not open with this cache_key"):
        broker.token_sync()
    assert gauges.revoked() == {"mb": "cache_key_mismatch"}  # /healthz: 503
    assert isinstance(SealError("x"), AuthenticationError)


class _LoginDuringRefresh:
    """A flow whose first refresh fails as revoked while `auth login` stores a new
    grant; later refreshes go to the real flow."""

    needs_refresh_token = True

    def __init__(self, real: Any, login: Any) -> None:
        self.real, self.login, self.calls = real, login, 0

    def acquire(self, refresh_token: str) -> Grant:
        self.calls += 1
        if self.calls == 1:
            self.login()
            raise GrantRevoked("old grant refused", code="invalid_grant")
        grant: Grant = self.real.acquire(refresh_token)
        return grant


def test_a_login_during_a_failing_refresh_keeps_the_new_grant(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    # Review L2: the failed refresh's error was written over the fresh login, whose
    # grant was then refused as dead until yet another login.
    path = str(tmp_path / "j.sqlite3")
    options = _options(auth_server, cache_key)
    login = _broker(options, _cache(path, cache_key, clock, tmp_path), clock)
    _login(login, auth_server)
    worker = _broker(options, _cache(path, cache_key, clock, tmp_path), clock)
    worker.token_sync()
    clock.advance(3600)  # the token needs a refresh

    def relogin() -> None:
        clock.advance(1)
        _login(login, auth_server)

    worker.flow = _LoginDuringRefresh(worker.flow, relogin)
    with pytest.raises(GrantRevoked):
        worker.token_sync()
    entry = worker.cache.load(worker.account)
    assert entry is not None and entry.last_error_code == ""
    assert auth_server.introspect(worker.token_sync())["active"]
    assert worker.flow.calls == 2


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_record_error_applies_only_to_the_grant_it_is_about(
    backend: str, request: pytest.FixtureRequest, cache_key: str, clock: Clock,
    tmp_path: Path,
) -> None:
    url = (
        str(tmp_path / "j.sqlite3") if backend == "sqlite"
        else request.getfixturevalue("pg_schema_url")
    )
    cache = _cache(url, cache_key, clock, tmp_path)
    cache.store("acct", access_token="", refresh_token="rt-one",
                expires_at=0.0, refresh_at=0.0, rt_issued_at=1234.5)
    assert not cache.record_error("acct", code="invalid_grant", message="old",
                                  rt_issued_at=1000.0)
    assert cache.load("acct").last_error_code == ""  # type: ignore[union-attr]
    assert cache.record_error("acct", code="invalid_grant", message="this one",
                              rt_issued_at=1234.5)
    assert cache.load("acct").last_error_code == "invalid_grant"  # type: ignore[union-attr]
    assert cache.record_error("new", code="no_refresh_token", message="none yet",
                              rt_issued_at=None)
    cache.close()


def test_a_refusal_that_is_not_about_the_token_keeps_the_shared_token(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    # Review L3: any POP3 refusal of one misconfigured mailbox expired the app-only
    # token every mailbox of the app shares, forcing a refresh per poll.
    options = _options(auth_server, cache_key, flow="client_credentials",
                       client_id="app", client_secret="app-secret")
    cache = _cache(str(tmp_path / "j.sqlite3"), cache_key, clock, tmp_path)
    wrong = _broker(options, cache, clock, mailbox="typo", username="nobody@example.com")
    good = _broker(options, cache, clock, mailbox="sales", username="sales@example.com")
    token = good.token_sync()
    for _ in range(3):  # three polls of the misconfigured mailbox
        clock.advance(60)
        assert not wrong.refused(token, "-ERR [AUTH] Authentication failed.")
        assert wrong.token_sync() == token
    assert good.token_sync() == token and len(auth_server.grants()) == 1
    # the server says the token itself is bad: refresh at once
    assert wrong.refused(token, "refused (OAuth error: scheme=bearer, status=401)")
    fresh = good.token_sync()
    assert fresh != token and len(auth_server.grants()) == 2
    # a token older than the grace period is refreshed on any refusal (a revoked one)
    clock.advance(REFUSAL_GRACE + 1)
    assert wrong.refused(fresh, "-ERR [AUTH] Authentication failed.")
    assert good.token_sync() != fresh and len(auth_server.grants()) == 3


def test_the_cache_reads_and_writes_only_what_it_uses(
    auth_server: AuthServer, cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    # Review L4: entries() had no caller; `description` was written, never read
    # (`auth status` describes an account from the config). The column stays in
    # the schema (dropping it is a journal migration) at its default.
    path = tmp_path / "j.sqlite3"
    cache = _cache(str(path), cache_key, clock, tmp_path)
    broker = _broker(_options(auth_server, cache_key), cache, clock)
    _login(broker, auth_server)
    broker.token_sync()
    assert not hasattr(TokenCache, "entries")
    assert "description" not in CachedToken.__dataclass_fields__
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT description FROM oauth_tokens").fetchall() == [("{}",)]
