"""mailpipe auth login / status / revoke / keygen against the local authorization server."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet

from mailpipe.cli import cli
from mailpipe.oauth.errors import GrantRevoked
from mailpipe.testing.authserver import DEVICE_GRANT, AuthServer


def _config(tmp_path: Path, server: AuthServer, key: str, oauth: str) -> Path:
    (tmp_path / "key").write_text(key)
    path = tmp_path / "p.toml"
    path.write_text(f"""
[state]
path = "journal.sqlite3"
[[mailboxes]]
name = "inbox"
host = "pop.example.com"
username = "alice"
pipeline = "p"
oauth = {{ {oauth}, ca_file = "{server.ca_file}", cache_key = {{ file = "key" }} }}
[pipelines.p]
processors = [{{ use = "parse" }}]
""")
    return path


def _ms(server: AuthServer) -> str:
    return (f'provider = "microsoft", flow = "device_code", client_id = "pub", '
            f'authority = "{server.url}/contoso"')


def _status(path: Path) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["auth", "status", str(path), "--json"])
    (line,) = [x for x in result.output.splitlines() if x.startswith('{"mailboxes"')]
    return result.exit_code, json.loads(line)["mailboxes"][0]


def test_keygen_prints_a_fernet_key() -> None:
    result = CliRunner().invoke(cli, ["auth", "keygen"])
    assert result.exit_code == 0
    Fernet(result.output.strip().encode())


def test_microsoft_device_code_login_then_status(
    auth_server: AuthServer, cache_key: str, tmp_path: Path
) -> None:
    path = _config(tmp_path, auth_server, cache_key, _ms(auth_server))
    code, row = _status(path)
    assert code == 1 and not row["cached"]
    result = CliRunner().invoke(cli, ["auth", "login", str(path), "inbox"])
    assert result.exit_code == 0, result.output
    assert f"open {auth_server.url}/device and enter ABCD-EFGH" in result.output
    assert len(auth_server.grants(DEVICE_GRANT)) == 1
    code, row = _status(path)
    assert code == 0 and row["cached"] and row["ok"]
    assert row["flow"] == "device_code" and row["refresh_token_age"] == "0.0d"
    assert row["scopes"] == [
        "https://outlook.office.com/POP.AccessAsUser.All", "offline_access"
    ]
    assert row["access_token_expires"] != "-" and row["last_error"] == ""


def test_oidc_device_login_waits_for_the_user_then_revoke(
    auth_server: AuthServer, cache_key: str, tmp_path: Path
) -> None:
    auth_server.device_pending = 1  # one authorization_pending answer first
    oidc = f'provider = "oidc", flow = "refresh_token", client_id = "pub", ' \
           f'issuer = "{auth_server.url}"'
    path = _config(tmp_path, auth_server, cache_key, oidc)
    result = CliRunner().invoke(cli, ["auth", "login", str(path), "inbox"])
    assert result.exit_code == 0, result.output
    assert f"open {auth_server.url}/device and enter the code ABCD-EFGH" in result.output
    assert [r.status for r in auth_server.token_requests] == [400, 200]
    (rt,) = auth_server.refresh
    result = CliRunner().invoke(cli, ["auth", "revoke", str(path), "inbox"])
    assert result.exit_code == 0, result.output
    assert "revoked at the provider (HTTP 200)" in result.output
    assert "cache entry deleted" in result.output
    assert auth_server.refresh[rt].revoked
    assert not _status(path)[1]["cached"]


def test_status_shows_the_provider_error_code(
    auth_server: AuthServer, cache_key: str, tmp_path: Path
) -> None:
    path = _config(tmp_path, auth_server, cache_key, _ms(auth_server))
    assert CliRunner().invoke(cli, ["auth", "login", str(path), "inbox"]).exit_code == 0
    auth_server.fail_next("invalid_grant")
    # The worker's next refresh fails (forced: the token is marked stale).
    from mailpipe.app import load_config
    from mailpipe.oauth.broker import TokenBroker
    from mailpipe.oauth.cache import TokenCache
    from mailpipe.oauth.sealing import Sealer

    options = load_config(path, entry_points=False).mailboxes[0].source_options.oauth
    cache = TokenCache(str(tmp_path / "journal.sqlite3"), base_dir=tmp_path,
                       sealer=Sealer(cache_key))
    broker = TokenBroker(options, protocol="pop3", username="alice", cache=cache)
    entry = cache.load(broker.account)
    broker.invalidate(entry.access_token)
    with pytest.raises(GrantRevoked):
        broker.token_sync()
    cache.close()
    code, row = _status(path)
    assert code == 1 and row["last_error_code"] == "invalid_grant"
    assert "AADSTS70000" in row["last_error"]
    text = CliRunner().invoke(cli, ["auth", "status", str(path)]).output
    assert "last error [invalid_grant]" in text


def test_login_of_a_mailbox_without_oauth_is_a_usage_error(
    auth_server: AuthServer, cache_key: str, tmp_path: Path
) -> None:
    path = _config(tmp_path, auth_server, cache_key, _ms(auth_server))
    result = CliRunner().invoke(cli, ["auth", "login", str(path), "other"])
    assert result.exit_code == 2
    assert "no mailbox 'other' with an oauth table; with one: inbox" in result.output


def test_google_installed_app_login_through_the_loopback_redirect(
    auth_server: AuthServer, cache_key: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import requests

    import mailpipe.oauth.cli as auth_cli

    auth_server.clients["gapp"] = "gapp-secret"
    auth_server.device_user = "alice"
    google = (f'provider = "google", flow = "refresh_token", client_id = "gapp", '
              f'client_secret = "gapp-secret", auth_uri = "{auth_server.url}/authorize", '
              f'token_uri = "{auth_server.url}/token"')
    path = _config(tmp_path, auth_server, cache_key, google)
    opened: list[str] = []

    def browser(url: str) -> None:  # the user's browser: consent, then the redirect
        opened.append(url)
        answer = requests.get(url, verify=str(auth_server.ca_file), timeout=30)
        assert answer.status_code == 200 and "signed in" in answer.text

    monkeypatch.setattr(auth_cli, "_show_url", browser)
    result = CliRunner().invoke(cli, ["auth", "login", str(path), "inbox"])
    assert result.exit_code == 0, result.output
    (url,) = opened
    assert "code_challenge_method=S256" in url and "access_type=offline" in url
    assert "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in url
    (exchange,) = auth_server.grants("authorization_code")
    assert "code_verifier" in exchange.form_keys
    code, row = _status(path)
    assert code == 0 and row["cached"] and row["scopes"] == ["https://mail.google.com/"]


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_oidc_revoke_authenticates_a_confidential_client(
    auth_server: AuthServer, cache_key: str, tmp_path: Path, method: str
) -> None:
    # Review L5: RFC 7009 §2.1 — a confidential client authenticates its revocation.
    auth_server.revocation_auth_methods = [method]
    oidc = (f'provider = "oidc", flow = "refresh_token", client_id = "app", '
            f'client_secret = "app-secret", issuer = "{auth_server.url}"')
    path = _config(tmp_path, auth_server, cache_key, oidc)
    from mailpipe.oauth.broker import TokenBroker
    from mailpipe.oauth.cache import TokenCache
    from mailpipe.oauth.grant import Grant
    from mailpipe.oauth.sealing import Sealer

    from .conftest import oauth

    options = oauth({"provider": "oidc", "flow": "refresh_token", "client_id": "app",
                     "client_secret": "app-secret", "issuer": auth_server.url,
                     "ca_file": str(auth_server.ca_file), "cache_key": cache_key})
    rt = auth_server.issue_refresh_token("alice", "app")
    with TokenCache(str(tmp_path / "journal.sqlite3"), base_dir=tmp_path,
                    sealer=Sealer(cache_key)) as cache:
        TokenBroker(options, protocol="pop3", username="alice", cache=cache).save(
            Grant(access_token="", expires_in=0, refresh_token=rt), previous=None)
    result = CliRunner().invoke(cli, ["auth", "revoke", str(path), "inbox"])
    assert result.exit_code == 0, result.output
    assert "revoked at the provider (HTTP 200)" in result.output
    assert auth_server.refresh[rt].revoked
    assert auth_server.revocations == [("app", method)]
    assert "app-secret" not in result.output


def test_the_local_server_refuses_an_unauthenticated_confidential_revocation(
    auth_server: AuthServer,
) -> None:
    import requests

    rt = auth_server.issue_refresh_token("alice", "app")
    for auth, form in ((None, {"client_id": "app"}),
                       (("app", "wrong"), {})):
        resp = requests.post(f"{auth_server.url}/revoke", auth=auth,
                             data={"token": rt, **form},
                             verify=str(auth_server.ca_file), timeout=10)
        assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"
    assert not auth_server.refresh[rt].revoked
