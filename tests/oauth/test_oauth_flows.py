"""Each provider flow through its real library against the local authorization server."""

import json
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailpipe.oauth.errors import ClientRejected, GrantRevoked, TokenEndpointBusy
from mailpipe.oauth.google import GoogleFlow
from mailpipe.oauth.microsoft import MicrosoftFlow
from mailpipe.oauth.oidc import OidcFlow
from mailpipe.testing.authserver import JWT_GRANT, AuthServer

from .conftest import oauth


def _ms(server: AuthServer, key: str, **extra: object) -> dict[str, object]:
    return {
        "provider": "microsoft",
        "authority": f"{server.url}/contoso",
        "cache_key": key,
        "ca_file": str(server.ca_file),
        **extra,
    }


def test_microsoft_client_credentials_with_secret(
    auth_server: AuthServer, cache_key: str
) -> None:
    options = oauth(_ms(auth_server, cache_key, flow="client_credentials",
                        tenant="contoso", client_id="app", client_secret="app-secret"))
    grant = MicrosoftFlow(options, "pop3").acquire("")
    info = auth_server.introspect(grant.access_token)
    assert info["active"] and info["username"] == "shared"
    assert info["scope"] == "https://outlook.office.com/.default"  # POP.AccessAsApp
    (request,) = auth_server.grants("client_credentials")
    assert request.path == "/contoso/oauth2/v2.0/token"


def test_microsoft_client_credentials_with_certificate(
    auth_server: AuthServer, cache_key: str, tmp_path: Path
) -> None:
    pem = tmp_path / "app.pem"
    cert = trustme.CA().issue_cert("mailpipe-app", key_type=trustme.KeyType.RSA)
    pem.write_bytes(cert.private_key_and_cert_chain_pem.bytes())
    options = oauth(_ms(auth_server, cache_key, flow="client_credentials",
                        tenant="contoso", client_id="certapp", certificate=str(pem)))
    grant = MicrosoftFlow(options, "imap").acquire("")
    assert auth_server.introspect(grant.access_token)["active"]
    (request,) = auth_server.grants("client_credentials")
    assert "client_assertion" in request.form_keys
    assert "client_secret" not in request.form_keys


def test_microsoft_certificate_without_rsa_key_is_a_clear_error(
    auth_server: AuthServer, cache_key: str, tmp_path: Path
) -> None:
    pem = tmp_path / "app.pem"
    cert = trustme.CA(key_type=trustme.KeyType.ECDSA).issue_cert("mailpipe-app")
    pem.write_bytes(cert.private_key_and_cert_chain_pem.bytes())
    options = oauth(_ms(auth_server, cache_key, flow="client_credentials",
                        tenant="contoso", client_id="certapp", certificate=str(pem)))
    with pytest.raises(ClientRejected, match="RSA key") as caught:
        MicrosoftFlow(options, "imap").acquire("")
    assert caught.value.code == "bad_credential"


def test_microsoft_device_code_refresh_sends_no_secret(
    auth_server: AuthServer, cache_key: str
) -> None:
    rt = auth_server.issue_refresh_token("alice", "pub")
    options = oauth(_ms(auth_server, cache_key, flow="device_code", client_id="pub"))
    grant = MicrosoftFlow(options, "pop3").acquire(rt)
    info = auth_server.introspect(grant.access_token)
    assert info["username"] == "alice"
    assert "https://outlook.office.com/POP.AccessAsUser.All" in info["scope"]
    (request,) = auth_server.grants("refresh_token")
    # AADSTS700025: a public client's refresh carries neither secret nor assertion.
    assert "client_secret" not in request.form_keys
    assert "client_assertion" not in request.form_keys


def _service_account(path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path.write_text(json.dumps({
        "type": "service_account",
        "client_email": "sa@example.iam",
        "client_id": "1234",
        "private_key_id": "k1",
        "private_key": pem,
        "token_uri": "https://oauth2.googleapis.com/token",
    }))
    return path


def test_google_service_account_acts_as_subject(
    auth_server: AuthServer, cache_key: str, tmp_path: Path
) -> None:
    options = oauth({
        "provider": "google", "flow": "service_account", "cache_key": cache_key,
        "service_account_file": str(_service_account(tmp_path / "sa.json")),
        "token_uri": f"{auth_server.url}/token", "ca_file": str(auth_server.ca_file),
    })
    grant = GoogleFlow(options, "pop3", username="bob@example.com").acquire("")
    assert auth_server.introspect(grant.access_token)["username"] == "bob@example.com"
    assert auth_server.grants(JWT_GRANT)
    assert 0 < grant.expires_in <= auth_server.lifetime


def test_google_installed_app_refresh_token(
    auth_server: AuthServer, cache_key: str
) -> None:
    auth_server.clients["gapp"] = "gapp-secret"
    rt = auth_server.issue_refresh_token("carol@example.com", "gapp")
    options = oauth({
        "provider": "google", "flow": "refresh_token", "client_id": "gapp",
        "client_secret": "gapp-secret", "cache_key": cache_key,
        "token_uri": f"{auth_server.url}/token", "ca_file": str(auth_server.ca_file),
    })
    grant = GoogleFlow(options, "imap", username="carol@example.com").acquire(rt)
    info = auth_server.introspect(grant.access_token)
    assert info["username"] == "carol@example.com"
    assert info["scope"] == "https://mail.google.com/"


def test_oidc_discovery_refresh_and_client_credentials(
    auth_server: AuthServer, cache_key: str
) -> None:
    rt = auth_server.issue_refresh_token("dave", "pub")
    refresh = oauth({"provider": "oidc", "flow": "refresh_token", "client_id": "pub",
                     "issuer": auth_server.url, "cache_key": cache_key,
                     "ca_file": str(auth_server.ca_file)})
    grant = OidcFlow(refresh, "pop3").acquire(rt)
    assert auth_server.introspect(grant.access_token)["username"] == "dave"
    app = oauth({"provider": "oidc", "flow": "client_credentials", "client_id": "app",
                 "client_secret": "app-secret", "audience": "mail",
                 "issuer": auth_server.url, "cache_key": cache_key,
                 "ca_file": str(auth_server.ca_file)})
    grant = OidcFlow(app, "pop3").acquire("")
    assert auth_server.introspect(grant.access_token)["active"]


@pytest.mark.parametrize(
    ("fault", "error", "code"),
    [
        ("invalid_grant", GrantRevoked, "invalid_grant"),
        ("consent", GrantRevoked, "consent_required"),
        ("expired_refresh_token", GrantRevoked, "invalid_grant"),
        ("429", TokenEndpointBusy, "temporarily_unavailable"),
    ],
)
def test_token_endpoint_faults_are_classified(
    auth_server: AuthServer, cache_key: str, fault: str, error: type, code: str
) -> None:
    rt = auth_server.issue_refresh_token("alice", "pub")
    options = oauth(_ms(auth_server, cache_key, flow="device_code", client_id="pub"))
    auth_server.fail_next(fault)
    with pytest.raises(error) as caught:
        MicrosoftFlow(options, "pop3").acquire(rt)
    assert caught.value.code == code
    assert rt not in str(caught.value)


def test_a_revoked_refresh_token_is_invalid_grant_for_oidc(
    auth_server: AuthServer, cache_key: str
) -> None:
    rt = auth_server.issue_refresh_token("alice", "pub")
    auth_server.revoke_user("alice")
    options = oauth({"provider": "oidc", "flow": "refresh_token", "client_id": "pub",
                     "issuer": auth_server.url, "cache_key": cache_key,
                     "ca_file": str(auth_server.ca_file)})
    with pytest.raises(GrantRevoked) as caught:
        OidcFlow(options, "pop3").acquire(rt)
    assert "AADSTS50173" in str(caught.value) and rt not in str(caught.value)


def test_a_wrong_client_secret_is_a_client_rejection(
    auth_server: AuthServer, cache_key: str
) -> None:
    options = oauth(_ms(auth_server, cache_key, flow="client_credentials",
                        tenant="contoso", client_id="app", client_secret="wrong"))
    with pytest.raises(ClientRejected) as caught:
        MicrosoftFlow(options, "pop3").acquire("")
    assert caught.value.code == "invalid_client"
    assert "wrong" not in str(caught.value)


def test_a_slow_endpoint_times_out_as_busy(
    auth_server: AuthServer, cache_key: str
) -> None:
    rt = auth_server.issue_refresh_token("alice", "pub")
    options = oauth({"provider": "oidc", "flow": "refresh_token", "client_id": "pub",
                     "issuer": auth_server.url, "cache_key": cache_key,
                     "ca_file": str(auth_server.ca_file), "timeout": "0.2s"})
    flow = OidcFlow(options, "pop3")
    flow.metadata()
    auth_server.fail_next("slow")
    with pytest.raises(TokenEndpointBusy) as caught:
        flow.acquire(rt)
    assert caught.value.code == "unreachable"


def test_an_untrusted_endpoint_certificate_is_refused(
    auth_server: AuthServer, cache_key: str
) -> None:
    options = oauth(_ms(auth_server, cache_key, flow="client_credentials",
                        tenant="contoso", client_id="app", client_secret="app-secret",
                        ca_file=None))
    with pytest.raises(TokenEndpointBusy, match="SSLError"):
        MicrosoftFlow(options, "pop3").acquire("")
    assert not auth_server.token_requests


def _google_app(server: AuthServer, key: str, **extra: object) -> object:
    server.clients["gapp"] = "gapp-secret"
    return oauth({
        "provider": "google", "flow": "refresh_token", "client_id": "gapp",
        "client_secret": "gapp-secret", "cache_key": key,
        "token_uri": f"{server.url}/token", "ca_file": str(server.ca_file), **extra,
    })


def test_google_honours_the_timeout(auth_server: AuthServer, cache_key: str) -> None:
    # Review M4: google-auth's own 120 s timeout outlived the refresh lease.
    rt = auth_server.issue_refresh_token("carol@example.com", "gapp")
    options = _google_app(auth_server, cache_key, timeout="0.2s")
    auth_server.fail_next("slow")  # answers after 2 s, then normally
    with pytest.raises(TokenEndpointBusy) as caught:
        GoogleFlow(options, "imap", username="carol@example.com").acquire(rt)  # type: ignore[arg-type]
    assert caught.value.code == "temporarily_unavailable"  # google-auth TransportError
    assert len(auth_server.token_requests) == 1


def test_google_makes_one_request_per_refresh(
    auth_server: AuthServer, cache_key: str
) -> None:
    # Review M4: google-auth retried a 429 internally (3 requests) and dropped
    # Retry-After; the broker's lease covers one request.
    rt = auth_server.issue_refresh_token("carol@example.com", "gapp")
    options = _google_app(auth_server, cache_key)
    auth_server.fail_next("429", count=3)
    with pytest.raises(TokenEndpointBusy) as caught:
        GoogleFlow(options, "imap", username="carol@example.com").acquire(rt)  # type: ignore[arg-type]
    assert len(auth_server.token_requests) == 1
    assert caught.value.retry_after == 30.0
    assert caught.value.code == "temporarily_unavailable"


def test_every_flow_reports_retry_after(
    auth_server: AuthServer, cache_key: str
) -> None:
    # Review M4: Retry-After of a 429 reaches TokenEndpointBusy for each provider.
    rt = auth_server.issue_refresh_token("alice", "pub")
    oidc = OidcFlow(oauth({"provider": "oidc", "flow": "refresh_token",
                           "client_id": "pub", "issuer": auth_server.url,
                           "cache_key": cache_key,
                           "ca_file": str(auth_server.ca_file)}), "pop3")
    microsoft = MicrosoftFlow(
        oauth(_ms(auth_server, cache_key, flow="device_code", client_id="pub")), "pop3"
    )
    for flow in (oidc, microsoft):
        auth_server.fail_next("429")
        with pytest.raises(TokenEndpointBusy) as caught:
            flow.acquire(rt)
        assert caught.value.retry_after == 30.0, flow
