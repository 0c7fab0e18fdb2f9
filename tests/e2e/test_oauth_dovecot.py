"""XOAUTH2 and OAUTHBEARER end to end: the pop3 and imap sources, the token broker and
its cache, the local authorization server (verified TLS) and a real Dovecot whose oauth2
passdb introspects every token at that server."""

from __future__ import annotations

import shutil
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from mailpipe.plugins.imap.source import ImapOptions, ImapSource
from mailpipe.plugins.pop3.source import Pop3Options, Pop3Source

from mailpipe.errors import AuthenticationError
from mailpipe.oauth import gauges, pool
from mailpipe.oauth.errors import GrantRevoked
from mailpipe.oauth.sealing import new_key
from mailpipe.testing.authserver import AuthServer
from mailpipe.testing.dovecot import dovecot_unavailable_reason
from mailpipe.testing.e2e import run_mailpipe
from mailpipe.testing.oauth_dovecot import OAuthDovecot
from mailpipe.testing.pytest_plugin import skip_or_fail

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(600)]

LIFETIME = 3600.0


class Clock:
    """Shared by the authorization server and the brokers; tests move it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.offset


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def idp(clock: Clock) -> Iterator[AuthServer]:
    directory = Path(tempfile.mkdtemp(prefix="mailpipe-idp-"))
    server = AuthServer(
        clients={"pub": None, "app": "app-secret"}, clock=clock, lifetime=LIFETIME,
        directory=directory,
    )
    with server:
        yield server
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def mailserver(idp: AuthServer) -> Iterator[OAuthDovecot]:
    reason = dovecot_unavailable_reason(imap=True)
    if reason is not None:
        skip_or_fail(reason)
    base = tempfile.mkdtemp(prefix="mailpipe-oauth-dovecot-")
    server = OAuthDovecot(
        base, introspection_url=f"{idp.url}/introspect", introspection_ca=idp.ca_file,
        imap=True,
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _state(clock: Clock, idp: AuthServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    clock.offset = 0.0
    idp.skew = 0.0
    monkeypatch.setattr(pool, "CLOCK", clock)
    gauges.reset()
    yield
    pool.close_all()


_users = iter(range(1, 10_000))


def _user(mailserver: OAuthDovecot, idp: AuthServer) -> str:
    name = f"oauser{next(_users)}"
    mailserver.add_user(name)
    for i in range(3):
        mailserver.deliver(name, b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i))
    return name


Options = Pop3Options | ImapOptions
Source = Pop3Source | ImapSource


def _options(
    mailserver: OAuthDovecot, idp: AuthServer, user: str, tmp_path: Path, key: str,
    auth: str, protocol: str = "pop3",
) -> Any:
    port = mailserver.pop3_port if protocol == "pop3" else mailserver.imap_port
    table: dict[str, Any] = {
        "host": "localhost", "port": port, "security": "starttls",
        "ca_file": str(mailserver.ca_file), "username": user, "auth": auth,
        "oauth": {
            "provider": "microsoft", "flow": "device_code", "client_id": "pub",
            "authority": f"{idp.url}/contoso", "ca_file": str(idp.ca_file),
            "cache_key": key,
        },
    }
    ctx = {"base_dir": str(tmp_path), "state_path": str(tmp_path / "journal.sqlite3")}
    model = Pop3Options if protocol == "pop3" else ImapOptions
    return model.model_validate(table, context=ctx)


def _source(options: Options, mailbox: str) -> Source:
    if isinstance(options, ImapOptions):
        return ImapSource(options, mailbox=mailbox)
    return Pop3Source(options, mailbox=mailbox)


def _login(options: Options, idp: AuthServer, user: str, mailbox: str) -> None:
    """What `mailpipe auth login` leaves behind: a refresh token in the cache."""
    from mailpipe.oauth.grant import Grant

    assert options.oauth is not None
    protocol = "imap" if isinstance(options, ImapOptions) else "pop3"
    broker = pool.broker_for(options.oauth, protocol=protocol, username=user,
                             mailbox=mailbox)
    rt = idp.issue_refresh_token(user, "pub")
    broker.save(Grant(access_token="", expires_in=0, refresh_token=rt), previous=None)


def _refused(idp: AuthServer, user: str) -> int:
    """Tokens of ``user`` that Dovecot's introspection found inactive."""
    return sum(1 for who, active in idp.introspections if who == user and not active)


async def _polled_once(
    mailserver: OAuthDovecot, idp: AuthServer, tmp_path: Path, key: str,
    protocol: str = "pop3",
) -> tuple[str, Source]:
    """A new user, logged in, whose mailbox was polled once (XOAUTH2)."""
    user = _user(mailserver, idp)
    options = _options(mailserver, idp, user, tmp_path, key, "xoauth2", protocol)
    _login(options, idp, user, "box")
    source = _source(options, "box")
    async with source.session() as session:
        await session.list()
        await session.commit()
    return user, source


@pytest.fixture
def key() -> str:
    return new_key()


@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_first_login(
    mailserver: OAuthDovecot, idp: AuthServer, tmp_path: Path, key: str, auth: str,
    protocol: str,
) -> None:
    user = _user(mailserver, idp)
    options = _options(mailserver, idp, user, tmp_path, key, auth, protocol)
    _login(options, idp, user, "box")
    before = len(idp.grants())
    with structlog.testing.capture_logs() as logs:
        async with _source(options, "box").session() as session:
            refs = await session.list()
            await session.commit()
    assert len(refs) == 3
    assert len(idp.grants()) == before + 1  # one refresh for the first token
    event = f"{protocol}_authenticated"
    assert [e["method"] for e in logs if e["event"] == event] == [auth]
    assert f"{protocol}-login: Info: Login: user=<{user}>, method={auth.upper()}" in (
        mailserver.log_text()
    )
    assert (user, True) in idp.introspections  # Dovecot asked the introspection end
    assert _refused(idp, user) == 0


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_refresh_before_expiry_then_reuse(
    mailserver: OAuthDovecot, idp: AuthServer, clock: Clock, tmp_path: Path, key: str,
    protocol: str,
) -> None:
    user = _user(mailserver, idp)
    options = _options(mailserver, idp, user, tmp_path, key, "xoauth2", protocol)
    _login(options, idp, user, "box")
    before = len(idp.grants())
    source = _source(options, "box")
    for _ in range(3):  # three polls, one token
        async with source.session() as session:
            await session.list()
            await session.commit()
    assert len(idp.grants()) == before + 1
    # Past refresh_at (expiry - 300 s margin - up to 60 s jitter), before expiry.
    clock.offset = LIFETIME - 200
    async with source.session() as session:
        await session.list()
        await session.commit()
    assert len(idp.grants()) == before + 2
    assert _refused(idp, user) == 0  # the old token was never presented late


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_expiry_mid_poll_reauthenticates_on_the_next_session(
    mailserver: OAuthDovecot, idp: AuthServer, clock: Clock, tmp_path: Path, key: str,
    protocol: str,
) -> None:
    from mailpipe.source import DELETE, acknowledge

    user = _user(mailserver, idp)
    options = _options(mailserver, idp, user, tmp_path, key, "oauthbearer", protocol)
    _login(options, idp, user, "box")
    source = _source(options, "box")
    got: list[bytes] = []

    async def take(session: Any, ref: Any) -> None:
        async for message in session.retrieve(
            [ref], spool_dir=tmp_path, spool_threshold=1 << 20
        ):
            got.append(message.raw)
        await acknowledge(session, [ref], DELETE)

    async with source.session() as session:
        refs = await session.list()
        await take(session, refs[0])
        clock.offset = LIFETIME + 10  # the token expires while the session is open
        await take(session, refs[1])
        await session.commit()  # the server checks the token only at login: this commits
    assert mailserver.mailbox_count(user) == 1
    async with source.session() as session:  # the next window: a fresh token
        refs = await session.list()
        await take(session, refs[0])
        await session.commit()
    assert mailserver.mailbox_count(user) == 0
    assert sorted(g.split(b"\r\n")[0] for g in got) == [
        b"Subject: m0", b"Subject: m1", b"Subject: m2"
    ]
    assert _refused(idp, user) == 0


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_token_refused_early_is_refreshed_once_and_retried(
    mailserver: OAuthDovecot, idp: AuthServer, tmp_path: Path, key: str, protocol: str
) -> None:
    user, source = await _polled_once(mailserver, idp, tmp_path, key, protocol)
    before = len(idp.grants())
    idp.skew = LIFETIME + 100  # the server's clock runs ahead: our token is stale there
    async with source.session() as session:
        assert len(await session.list()) == 3
        await session.commit()
    assert _refused(idp, user) == 1  # the stale token, once
    assert len(idp.grants()) == before + 1


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_revoked_grant_is_an_auth_failure_with_the_provider_code(
    mailserver: OAuthDovecot, idp: AuthServer, tmp_path: Path, key: str, protocol: str
) -> None:
    user, source = await _polled_once(mailserver, idp, tmp_path, key, protocol)
    idp.revoke_user(user)  # consent withdrawn: access and refresh tokens die
    requests = len(idp.token_requests)
    with structlog.testing.capture_logs() as logs, pytest.raises(GrantRevoked) as caught:
        async with source.session():
            pass
    assert isinstance(caught.value, AuthenticationError)  # the scheduler's long back-off
    assert caught.value.code == "invalid_grant"
    failed = [e for e in logs if e["event"] == "oauth_refresh_failed"]
    assert len(failed) == 1 and failed[0]["code"] == "invalid_grant"
    assert "AADSTS50173" in failed[0]["error"]
    assert gauges.revoked() == {"box": "invalid_grant"}
    assert mailserver.mailbox_count(user) == 3  # nothing lost
    with pytest.raises(GrantRevoked):  # the next poll asks nobody
        async with source.session():
            pass
    assert len(idp.token_requests) == requests + 1


def test_two_workers_share_one_cache_and_refresh_once(
    mailserver: OAuthDovecot, idp: AuthServer, tmp_path: Path, key: str
) -> None:
    """Two `mailpipe run --once` processes, one mailbox each, of one account."""
    user = _user(mailserver, idp)
    for i in range(3, 6):
        mailserver.deliver(user, b"Subject: m%d\r\n\r\nbody\r\n" % i)
    (tmp_path / "key").write_text(key)
    out = tmp_path / "out"
    configs = []
    for worker in ("w1", "w2"):
        config = tmp_path / f"{worker}.toml"
        config.write_text(textwrap.dedent(f"""
            [state]
            path = "journal.sqlite3"
            [scheduler]
            spool_dir = "spool-{worker}"
            [quarantine]
            dir = "quarantine-{worker}"
            [[mailboxes]]
            name = "{worker}-box"
            host = "localhost"
            port = {mailserver.pop3_port}
            security = "starttls"
            ca_file = "{mailserver.ca_file}"
            username = "{user}"
            auth = "xoauth2"
            delete = "never"
            pipeline = "keep"
            oauth = {{ provider = "microsoft", flow = "device_code", client_id = "pub", authority = "{idp.url}/contoso", ca_file = "{idp.ca_file}", cache_key = {{ file = "key" }} }}
            [pipelines.keep]
            processors = [{{ use = "store.maildir", path = "{out}-{worker}" }}]
        """))
        configs.append(config)
    # The login both share (journal.sqlite3 is the same file for both configs).
    options = _options(mailserver, idp, user, tmp_path, key, "xoauth2")
    _login(options, idp, user, "setup")
    pool.close_all()
    before = len(idp.grants())
    idp.slow_seconds = 3.0
    idp.fail_next("slow")  # the first refresh takes a while: the other worker waits
    results: dict[str, Any] = {}

    def run(config: Path) -> None:
        results[config.stem] = run_mailpipe(config, "run", "{config}", "--once")

    threads = [threading.Thread(target=run, args=(c,)) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for name, done in results.items():
        assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])
    assert len(idp.grants()) == before + 1  # one refresh at the token endpoint
    for worker in ("w1", "w2"):
        stored = [p for sub in ("new", "cur")
                  for p in (Path(f"{out}-{worker}") / sub).iterdir()]
        assert len(stored) == 6  # (not the store's per-key markers beside them)
    assert _refused(idp, user) == 0
