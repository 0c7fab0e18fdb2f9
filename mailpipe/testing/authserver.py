"""A local OAuth 2.0 authorization server over verified TLS, for tests.

It speaks just enough of RFC 6749 (token endpoint: refresh_token, client_credentials,
JWT bearer for Google service accounts), RFC 8628 (device authorization), RFC 7662
(introspection, which Dovecot's ``oauth2`` passdb calls), RFC 7009 (revocation: a
confidential client must authenticate, §2.1; ``revocations`` records who did, how) and
OpenID discovery (``/.well-known/openid-configuration`` at the root for OIDC clients
and ``/TENANT/v2.0/...`` for msal) for msal, google-auth and authlib to work against it
unchanged. Faults: the next token responses can be ``invalid_grant``, a 429, slow, or an
expired refresh token; ``skew`` moves the server's clock against the client's.

Every token request is recorded (``token_requests``), so a test can count refreshes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["AuthServer", "IssuedToken"]

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass(slots=True)
class IssuedToken:
    """An access or refresh token the server issued."""

    username: str
    client_id: str
    expires_at: float  # server clock
    revoked: bool = False
    scope: str = ""


@dataclass(slots=True)
class _Fault:
    kind: str  # invalid_grant | 429 | slow | expired_refresh_token | consent
    remaining: int


@dataclass(slots=True)
class TokenRequest:
    """One request seen at the token endpoint (secrets left out)."""

    grant_type: str
    client_id: str
    path: str
    status: int = 200
    error: str = ""
    form_keys: tuple[str, ...] = field(default_factory=tuple)


class AuthServer:
    """The server; use as a context manager. ``clients`` maps client ids to their
    secret (None: a public client; ``"cert"``: a client that signs an assertion).

    ``lifetime`` is the access-token lifetime in seconds; ``clock`` the server's time
    (tests move it); ``skew`` is added to it (a server clock ahead of the client's).
    ``app_user`` is the mailbox user that app-only (client credentials) tokens are
    introspected as.
    """

    def __init__(
        self,
        *,
        clients: dict[str, str | None] | None = None,
        lifetime: float = 3600.0,
        clock: Callable[[], float] = time.time,
        app_user: str = "",
        directory: Path | None = None,
    ) -> None:
        self.clients: dict[str, str | None] = dict(clients or {})
        self.lifetime = lifetime
        self.clock = clock
        self.skew = 0.0
        self.slow_seconds = 2.0
        self.app_user = app_user
        self.access: dict[str, IssuedToken] = {}
        self.refresh: dict[str, IssuedToken] = {}
        self.devices: dict[str, tuple[str, str, int]] = {}  # code -> user, client, pending
        #: authorization code -> (user, client, redirect_uri, PKCE challenge)
        self.codes: dict[str, tuple[str, str, str, str]] = {}
        self.device_user = "alice"
        self.device_pending = 0
        self.token_requests: list[TokenRequest] = []
        #: How the revocation endpoint accepts client authentication (discovery).
        self.revocation_auth_methods = ["client_secret_basic", "client_secret_post"]
        #: (client id, authentication method or "none"), per accepted revocation.
        self.revocations: list[tuple[str, str]] = []
        #: (user of the token or "", whether it was active), per introspection.
        self.introspections: list[tuple[str, bool]] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._dir = Path(directory or tempfile.mkdtemp(prefix="mailpipe-authsrv-"))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.ca_file = self._dir / "auth-ca.pem"
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Make the CA and certificate, bind 127.0.0.1:0 and serve on a thread."""
        import trustme

        ca = trustme.CA(organization_name="mailpipe test authorization server")
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(self.ca_file))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        handler = _handler_for(self)
        server = _QuietServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, name="authserver", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> AuthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The issuer URL (``https://127.0.0.1:PORT``)."""
        return f"https://127.0.0.1:{self.port}"

    def now(self) -> float:
        """The server's clock (``clock() + skew``)."""
        return self.clock() + self.skew

    # -- test controls ----------------------------------------------------------------

    def issue_refresh_token(
        self, username: str, client_id: str, *, lifetime: float = 90 * 86400.0
    ) -> str:
        """A refresh token for ``username`` as if a login had happened."""
        rt = "rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self.refresh[rt] = IssuedToken(username, client_id, self.now() + lifetime)
        return rt

    def issue_access_token(self, username: str, client_id: str = "direct") -> str:
        """An access token for ``username`` (for tests that skip the token endpoint)."""
        return self._new_access(username, client_id, "")

    def revoke_user(self, username: str) -> None:
        """Revoke every token of ``username`` (consent withdrawn)."""
        with self._lock:
            for token in (*self.access.values(), *self.refresh.values()):
                if token.username == username:
                    token.revoked = True

    def fail_next(self, kind: str, count: int = 1) -> None:
        """Make the next ``count`` token requests fail: ``invalid_grant``, ``429``,
        ``slow`` (answers after ``slow_seconds``, then normally),
        ``expired_refresh_token`` or ``consent``."""
        with self._lock:
            self._faults.append(_Fault(kind, count))

    def grants(self, grant_type: str | None = None) -> list[TokenRequest]:
        """Token requests that got a token (optionally of one grant type)."""
        return [
            r for r in self.token_requests
            if r.status == 200 and (grant_type is None or r.grant_type == grant_type)
        ]

    # -- behaviour ------------------------------------------------------------------

    def _new_access(self, username: str, client_id: str, scope: str) -> str:
        token = "at-" + secrets.token_urlsafe(24)
        with self._lock:
            self.access[token] = IssuedToken(
                username, client_id, self.now() + self.lifetime, scope=scope
            )
        return token

    def _take_fault(self) -> str | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0:
                    fault.remaining -= 1
                    return fault.kind
        return None

    def discovery(self, base: str) -> dict[str, Any]:
        """The OpenID configuration served at ``base``."""
        return {
            "issuer": base,
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "introspection_endpoint": f"{self.url}/introspect",
            "revocation_endpoint": f"{self.url}/revoke",
            "revocation_endpoint_auth_methods_supported": [
                *self.revocation_auth_methods, "none"
            ],
            "response_types_supported": ["code"],
            "grant_types_supported": [
                "refresh_token", "client_credentials", DEVICE_GRANT, JWT_GRANT
            ],
        }

    def token(
        self, form: dict[str, str], auth: tuple[str, str] | None, path: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Answer a token request: (status, JSON body, extra headers)."""
        grant = form.get("grant_type", "")
        client_id = auth[0] if auth else form.get("client_id", "")
        record = TokenRequest(
            grant_type=grant, client_id=client_id, path=path,
            form_keys=tuple(sorted(form)),
        )
        self.token_requests.append(record)
        status, body, headers = self._token(form, auth, grant, client_id)
        record.status = status
        record.error = str(body.get("error", ""))
        return status, body, headers

    def _client_ok(
        self, form: dict[str, str], auth: tuple[str, str] | None, client_id: str
    ) -> bool:
        if client_id not in self.clients:
            return False
        expected = self.clients[client_id]
        presented = auth[1] if auth else form.get("client_secret")
        if expected is None:  # public client: presenting a secret is an error
            return presented is None and "client_assertion" not in form
        if expected == "cert":
            return bool(form.get("client_assertion"))
        return presented == expected

    def _token(
        self,
        form: dict[str, str],
        auth: tuple[str, str] | None,
        grant: str,
        client_id: str,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        fault = self._take_fault()
        if fault == "429":
            return 429, {"error": "temporarily_unavailable"}, {"Retry-After": "30"}
        if fault == "slow":
            time.sleep(self.slow_seconds)
        if fault in ("invalid_grant", "consent"):
            desc = (
                "AADSTS65001: The user or administrator has not consented"
                if fault == "consent"
                else "AADSTS70000: The provided grant has been revoked."
            )
            code = "invalid_grant" if fault == "invalid_grant" else "consent_required"
            return 400, {"error": code, "error_description": desc}, {}
        if fault == "expired_refresh_token":
            return 400, {
                "error": "invalid_grant",
                "error_description": "AADSTS700082: The refresh token has expired due "
                "to inactivity.",
            }, {}
        if grant == JWT_GRANT:
            return self._jwt_grant(form)
        if not self._client_ok(form, auth, client_id):
            return 401, {
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided.",
            }, {}
        scope = form.get("scope", "")
        if grant == "client_credentials":
            token = self._new_access(self.app_user, client_id, scope)
            return 200, self._answer(token, scope, refresh=None), {}
        if grant == "refresh_token":
            rt = form.get("refresh_token", "")
            with self._lock:
                issued = self.refresh.get(rt)
            if issued is None or issued.revoked or issued.client_id != client_id:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "AADSTS50173: The provided grant has expired "
                    "due to it being revoked.",
                }, {}
            if issued.expires_at < self.now():
                return 400, {"error": "invalid_grant",
                             "error_description": "refresh token expired"}, {}
            token = self._new_access(issued.username, client_id, scope)
            return 200, self._answer(token, scope, refresh=rt), {}
        if grant == "authorization_code":
            with self._lock:
                issued_code = self.codes.pop(form.get("code", ""), None)
            if issued_code is None or issued_code[1] != client_id or (
                issued_code[2] != form.get("redirect_uri")
            ) or issued_code[3] != _s256(form.get("code_verifier", "")):
                return 400, {"error": "invalid_grant",
                             "error_description": "bad code, redirect or verifier"}, {}
            rt = self.issue_refresh_token(issued_code[0], client_id)
            token = self._new_access(issued_code[0], client_id, scope)
            return 200, self._answer(token, scope, refresh=rt), {}
        if grant == DEVICE_GRANT:
            code = form.get("device_code", "")
            with self._lock:
                device = self.devices.get(code)
                if device is not None and device[2] > 0:
                    self.devices[code] = (device[0], device[1], device[2] - 1)
                    return 400, {"error": "authorization_pending"}, {}
                self.devices.pop(code, None)
            if device is None:
                return 400, {"error": "expired_token"}, {}
            rt = self.issue_refresh_token(device[0], client_id)
            token = self._new_access(device[0], client_id, scope)
            return 200, self._answer(token, scope, refresh=rt), {}
        return 400, {"error": "unsupported_grant_type"}, {}

    def _jwt_grant(
        self, form: dict[str, str]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        # A Google service account's signed assertion: the signature is not checked
        # here (tests make throwaway keys); issuer and subject are.
        assertion = form.get("assertion", "")
        try:
            payload = json.loads(_b64url(assertion.split(".")[1]))
        except (IndexError, ValueError):
            return 400, {"error": "invalid_grant", "error_description": "bad JWT"}, {}
        issuer = str(payload.get("iss", ""))
        if issuer not in self.clients:
            return 401, {"error": "unauthorized_client",
                         "error_description": "Client is unauthorized"}, {}
        user = str(payload.get("sub") or self.app_user)
        token = self._new_access(user, issuer, str(payload.get("scope", "")))
        body = {"access_token": token, "token_type": "Bearer",
                "expires_in": int(self.lifetime)}
        return 200, body, {}

    def _answer(self, token: str, scope: str, *, refresh: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": int(self.lifetime),
            "ext_expires_in": int(self.lifetime),
            "scope": scope,
        }
        if refresh is not None:
            body["refresh_token"] = refresh
        return body

    def device_authorization(self, form: dict[str, str]) -> dict[str, Any]:
        """RFC 8628 §3.2: a device code approved for ``device_user``."""
        code = "dc-" + secrets.token_urlsafe(16)
        with self._lock:
            self.devices[code] = (
                self.device_user, form.get("client_id", ""), self.device_pending
            )
        return {
            "device_code": code,
            "user_code": "ABCD-EFGH",
            "verification_uri": f"{self.url}/device",
            "expires_in": 900,
            "interval": 1,
            "message": f"To sign in, open {self.url}/device and enter ABCD-EFGH.",
        }

    def authorize(self, query: dict[str, str]) -> str:
        """The browser step of the authorization code flow (RFC 6749 §4.1, PKCE S256):
        ``device_user`` consents at once; returns the redirect location."""
        code = "ac-" + secrets.token_urlsafe(16)
        redirect = query.get("redirect_uri", "")
        with self._lock:
            self.codes[code] = (
                self.device_user, query.get("client_id", ""), redirect,
                query.get("code_challenge", ""),
            )
        params = urllib.parse.urlencode({"code": code, "state": query.get("state", "")})
        return f"{redirect}?{params}"

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662: active only while issued, unrevoked and unexpired (server clock)."""
        with self._lock:
            issued = self.access.get(token)
        active = not (
            issued is None or issued.revoked or issued.expires_at <= self.now()
        )
        self.introspections.append((issued.username if issued else "", active))
        if issued is None or not active:
            return {"active": False}
        return {
            "active": True,
            "username": issued.username,
            "client_id": issued.client_id,
            "scope": issued.scope,
            "exp": int(issued.expires_at),
        }

    def revocation(
        self, form: dict[str, str], auth: tuple[str, str] | None
    ) -> tuple[int, dict[str, Any]]:
        """RFC 7009 §2.1: a confidential client authenticates (with a method of
        ``revocation_auth_methods``), a public one names itself; then revoke."""
        client_id = auth[0] if auth else form.get("client_id", "")
        method = (
            "client_secret_basic" if auth
            else "client_secret_post" if "client_secret" in form else "none"
        )
        confidential = self.clients.get(client_id) is not None
        if not self._client_ok(form, auth, client_id) or (
            confidential and method not in self.revocation_auth_methods
        ):
            return 401, {"error": "invalid_client"}
        self.revoke(form.get("token", ""))
        with self._lock:
            self.revocations.append((client_id, method))
        return 200, {}

    def revoke(self, token: str) -> None:
        """RFC 7009: revoke a refresh or access token (unknown ones are ignored)."""
        with self._lock:
            for table in (self.refresh, self.access):
                if token in table:
                    table[token].revoked = True


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeout tests) is not an error of the server


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _handler_for(server: AuthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # Dovecot keeps connections alive

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def _send(
            self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _form(self) -> dict[str, str]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode() if length else ""
            return dict(urllib.parse.parse_qsl(raw, keep_blank_values=True))

        def _basic(self) -> tuple[str, str] | None:
            value = self.headers.get("Authorization", "")
            if not value.lower().startswith("basic "):
                return None
            user, _, pw = base64.b64decode(value[6:]).decode().partition(":")
            return urllib.parse.unquote(user), urllib.parse.unquote(pw)

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path.endswith("/authorize"):
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                self.send_response(302)
                self.send_header("Location", server.authorize(query))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path.endswith("/.well-known/openid-configuration"):
                prefix = path.removesuffix("/.well-known/openid-configuration")
                prefix = prefix.removesuffix("/v2.0")
                self._send(200, server.discovery(server.url + prefix))
                return
            self._send(404, {"error": "not_found"})

        def do_POST(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            form = self._form()
            if path.endswith("/token"):
                status, body, headers = server.token(form, self._basic(), path)
                self._send(status, body, headers)
            elif path.endswith("/devicecode"):
                self._send(200, server.device_authorization(form))
            elif path.endswith("/introspect"):
                self._send(200, server.introspect(form.get("token", "")))
            elif path.endswith("/revoke"):
                self._send(*server.revocation(form, self._basic()))
            else:
                self._send(404, {"error": "not_found"})

    return Handler
