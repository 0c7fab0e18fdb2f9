"""The installed-app sign-in (RFC 8252): a browser, a redirect to 127.0.0.1, PKCE.

Used by ``mailpipe auth login`` for Google's installed-app refresh token. A one-shot
HTTP listener on ``127.0.0.1:0`` receives the redirect; the code is exchanged with the
PKCE verifier (RFC 7636, S256) and the client secret. ``state`` must come back intact.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from mailpipe.oauth.grant import Grant, error_from, transport_errors, trust
from mailpipe.oauth.options import GoogleOAuth


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class _Redirect(HTTPServer):
    query: dict[str, str]


class _Handler(BaseHTTPRequestHandler):
    server: _Redirect

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        query = urllib.parse.urlsplit(self.path).query
        self.server.query = dict(urllib.parse.parse_qsl(query))
        body = b"mailpipe: signed in; you can close this window.\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def loopback_login(
    options: GoogleOAuth,
    scopes: list[str],
    *,
    show: Callable[[str], None],
    wait: float = 300.0,
) -> Grant:
    """Show the authorization URL (``show``), wait up to ``wait`` seconds for the
    browser's redirect, exchange the code; return the grant with its refresh token."""
    assert options.client_secret is not None
    server = _Redirect(("127.0.0.1", 0), _Handler)
    server.query = {}
    server.timeout = wait
    redirect = f"http://127.0.0.1:{server.server_address[1]}/"
    verifier = secrets.token_urlsafe(48)
    state = secrets.token_urlsafe(16)
    params = {
        "client_id": options.client_id,
        "redirect_uri": redirect,
        "response_type": "code",
        "scope": " ".join(scopes),
        "access_type": "offline",  # Google: issue a refresh token
        "prompt": "consent",
        "code_challenge": _challenge(verifier),
        "code_challenge_method": "S256",
        "state": state,
    }
    url = f"{options.auth_uri}?{urllib.parse.urlencode(params)}"
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        show(url)
        thread.join(wait + 5)
    finally:
        server.server_close()
    query = server.query
    where = f"google {options.token_uri}"
    if not query:
        raise error_from("expired_token", "no redirect arrived", where=where)
    if query.get("state") != state:
        raise error_from("invalid_request", "the state did not match", where=where)
    if "code" not in query:
        raise error_from(query.get("error", "access_denied"),
                         query.get("error_description", ""), where=where)
    import requests

    session = trust(requests.Session(), options.ca_file)
    with transport_errors(where):
        resp = session.post(options.token_uri, data={
            "grant_type": "authorization_code",
            "code": query["code"],
            "redirect_uri": redirect,
            "client_id": options.client_id,
            "client_secret": options.client_secret.get(),
            "code_verifier": verifier,
        }, timeout=options.timeout)
    body = resp.json()
    if "access_token" not in body:
        raise error_from(str(body.get("error", "unknown_error")),
                         str(body.get("error_description", "")), where=where)
    return Grant(
        access_token=str(body["access_token"]),
        expires_in=float(body.get("expires_in", 3600)),
        refresh_token=str(body.get("refresh_token", "")),
    )
