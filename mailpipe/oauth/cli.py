"""``mailpipe auth``: log a mailbox in, show every mailbox's tokens, revoke, make a key.

Exit codes as elsewhere: 0 success, 1 failure (login refused, a token in trouble for
``status``), 2 usage (bad config, unknown mailbox, a mailbox without ``oauth``).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import click

from mailpipe.errors import ConfigError, MailpipeError, PluginError
from mailpipe.oauth.broker import TokenBroker
from mailpipe.oauth.cache import CachedToken, TokenCache
from mailpipe.oauth.errors import REVOKED_CODES
from mailpipe.oauth.grant import Grant, error_from, transport_errors
from mailpipe.oauth.options import AnyOAuth, GoogleOAuth, MicrosoftOAuth, OidcOAuth
from mailpipe.oauth.scopes import Protocol
from mailpipe.oauth.sealing import Sealer, new_key

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: Most token polls of one device-code login (RFC 8628 §3.4), whatever expires_in says.
MAX_DEVICE_POLLS = 400


def _app(config: str) -> Any:
    from mailpipe.app import open_app

    try:
        return open_app(config)
    except (ConfigError, PluginError) as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_USAGE)


def _oauth_mailboxes(app: Any) -> list[tuple[str, AnyOAuth, Protocol, str]]:
    """(mailbox, oauth options, protocol, username) of every mailbox with ``oauth``."""
    found = []
    for spec in app.config.mailboxes:
        options = getattr(spec.source_options, "oauth", None)
        if options is None:
            continue
        protocol: Protocol = "imap" if spec.config.source == "imap" else "pop3"
        username = str(getattr(spec.source_options, "username", ""))
        found.append((spec.name, options, protocol, username))
    return found


def _one(app: Any, mailbox: str) -> tuple[AnyOAuth, Protocol, str]:
    for name, options, protocol, username in _oauth_mailboxes(app):
        if name == mailbox:
            return options, protocol, username
    names = ", ".join(n for n, *_ in _oauth_mailboxes(app)) or "none"
    click.echo(f"no mailbox {mailbox!r} with an oauth table; with one: {names}", err=True)
    sys.exit(EXIT_USAGE)


def _cache(options: AnyOAuth, *, sealed: bool = True) -> TokenCache:
    return TokenCache(
        options.state_path or "var/mailpipe.sqlite3",
        base_dir=options.base_dir,
        sealer=Sealer(options.cache_key.get()) if sealed else None,
    )


@click.group()
def auth() -> None:
    """OAuth 2.0 tokens of the mailboxes that have an oauth table."""


@auth.command()
def keygen() -> None:
    """Print a new random cache_key (keep it as a secret: env, file or command)."""
    click.echo(new_key())


@auth.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("mailbox")
def login(config: str, mailbox: str) -> None:
    """Sign MAILBOX in and store its tokens in the shared cache.

    Delegated flows (Microsoft device_code, OIDC refresh_token) print a URL and a code
    to enter in a browser, on any device, and wait for the sign-in; Google's
    installed-app flow prints a URL to open on this machine (redirect to 127.0.0.1). App-only flows
    (client credentials, Google service account) fetch a token once to prove the setup.
    """
    app = _app(config)
    options, protocol, username = _one(app, mailbox)
    cache = _cache(options)
    broker = TokenBroker(
        options, protocol=protocol, username=username, cache=cache, mailbox=mailbox
    )
    try:
        if not broker.flow.needs_refresh_token:
            token = broker.token_sync()
            del token
        elif isinstance(options, MicrosoftOAuth):
            broker.save(_microsoft_device_login(broker), previous=None)
        elif isinstance(options, OidcOAuth):
            broker.save(_oidc_device_login(broker), previous=None)
        else:
            assert isinstance(options, GoogleOAuth)
            from mailpipe.oauth.loopback import loopback_login

            grant = loopback_login(
                options, list(options.effective_scopes(protocol)), show=_show_url
            )
            broker.save(grant, previous=None)
    except MailpipeError as exc:
        click.echo(f"login failed: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        cache.close()
    click.echo(f"{mailbox}: signed in ({options.provider}, {options.flow}); tokens cached.")


def _show_url(url: str) -> None:
    click.echo("Open this URL in a browser on this machine and sign in:")
    click.echo(url)


def _microsoft_device_login(broker: TokenBroker) -> Grant:
    from mailpipe.oauth.microsoft import MicrosoftFlow, grant_from

    flow = broker.flow
    assert isinstance(flow, MicrosoftFlow)
    app = flow.public_app()
    with transport_errors(flow.where):
        device = app.initiate_device_flow(scopes=flow.scopes)
    if "user_code" not in device:
        raise error_from(
            str(device.get("error", "unknown_error")),
            str(device.get("error_description", "")),
            where=flow.where,
        )
    click.echo(device["message"])
    with transport_errors(flow.where):
        result = app.acquire_token_by_device_flow(device)
    return grant_from(result, where=flow.where)


def _oidc_device_login(broker: TokenBroker) -> Grant:
    """RFC 8628 with the provider's device authorization endpoint."""
    from mailpipe.oauth.oidc import OidcFlow

    flow = broker.flow
    assert isinstance(flow, OidcFlow)
    meta = flow.metadata()
    endpoint = meta.get("device_authorization_endpoint")
    if not endpoint:
        raise error_from(
            "unsupported_grant_type",
            "the provider names no device_authorization_endpoint",
            where=flow.where,
        )
    session = flow.session()
    timeout = flow.options.timeout
    data = {"client_id": flow.options.client_id, "scope": " ".join(flow.scopes)}
    with transport_errors(flow.where):
        device = session.post(endpoint, data=data, timeout=timeout,
                              withhold_token=True).json()
    if "device_code" not in device:
        raise error_from(str(device.get("error", "unknown_error")),
                         str(device.get("error_description", "")), where=flow.where)
    uri = device.get("verification_uri_complete") or device.get("verification_uri")
    click.echo(f"To sign in, open {uri} and enter the code {device['user_code']}.")
    interval = float(device.get("interval", 5))
    grant_type = "urn:ietf:params:oauth:grant-type:device_code"
    for _ in range(MAX_DEVICE_POLLS):
        with transport_errors(flow.where):
            resp = session.post(
                meta["token_endpoint"],
                data={"grant_type": grant_type, "device_code": device["device_code"],
                      "client_id": flow.options.client_id},
                timeout=timeout, withhold_token=True,
            )
        body = resp.json()
        if "access_token" in body:
            return Grant(
                access_token=str(body["access_token"]),
                expires_in=float(body.get("expires_in", 3600)),
                refresh_token=str(body.get("refresh_token", "")),
            )
        error = str(body.get("error", ""))
        if error == "slow_down":
            interval += 5  # RFC 8628 §3.5
        elif error != "authorization_pending":
            raise error_from(error or "unknown_error",
                             str(body.get("error_description", "")), where=flow.where)
        time.sleep(interval)
    raise error_from("expired_token", "the sign-in was not completed", where=flow.where)


def _when(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _age(value: float | None, now: float) -> str:
    if value is None:
        return "-"
    days = (now - value) / 86400
    return f"{days:.1f}d"


def _row(
    name: str, options: AnyOAuth, protocol: Protocol, entry: CachedToken | None,
    now: float,
) -> dict[str, Any]:
    e = entry or CachedToken(account="")
    trouble = e.last_error_code in REVOKED_CODES or e.last_error_code in (
        "no_refresh_token", "invalid_client", "unauthorized_client", "bad_credential"
    )
    risk_at = (
        e.rt_issued_at + options.refresh_token_max_age if e.rt_issued_at else None
    )
    return {
        "mailbox": name,
        "provider": options.provider,
        "flow": options.flow,
        "scopes": list(options.effective_scopes(protocol)),
        "access_token_expires": _when(e.expires_at),
        "refresh_token_age": _age(e.rt_issued_at, now),
        "refresh_token_at_risk": _when(risk_at),
        "last_refresh": _when(e.last_refresh),
        "refreshes": e.refreshes,
        "last_error": e.last_error,
        "last_error_code": e.last_error_code,
        "cached": entry is not None and bool(e.sealed),
        "ok": entry is not None and bool(e.sealed) and not trouble,
    }


@auth.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON document (for scripts).")
def status(config: str, as_json: bool) -> None:
    """Show each OAuth mailbox: flow, scopes, token expiry, refresh-token age, last
    refresh and last error. Exits 1 when a mailbox has no usable grant."""
    app = _app(config)
    rows = []
    now = time.time()
    for name, options, protocol, username in _oauth_mailboxes(app):
        cache = _cache(options, sealed=False)  # never opens a secret
        try:
            entry = cache.load(options.account_key(protocol, username),
                               open_secrets=False)
        finally:
            cache.close()
        rows.append(_row(name, options, protocol, entry, now))
    if as_json:
        click.echo(json.dumps({"mailboxes": rows}, ensure_ascii=False))
    else:
        for row in rows:
            click.echo(
                f"{row['mailbox']}: {row['provider']} {row['flow']} "
                f"scopes={' '.join(row['scopes'])} "
                f"expires={row['access_token_expires']} "
                f"refresh_token_age={row['refresh_token_age']} "
                f"last_refresh={row['last_refresh']}"
            )
            if row["last_error"]:
                click.echo(f"  last error [{row['last_error_code']}]: {row['last_error']}")
            if not row["cached"]:
                click.echo(f"  not signed in: run `mailpipe auth login {config} "
                           f"{row['mailbox']}`")
    sys.exit(EXIT_OK if all(r["ok"] for r in rows) else EXIT_FAILURE)


@auth.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("mailbox")
def revoke(config: str, mailbox: str) -> None:
    """Revoke MAILBOX's refresh token at the provider (where it has a revocation
    endpoint) and delete the account's tokens from the cache."""
    app = _app(config)
    options, protocol, username = _one(app, mailbox)
    cache = _cache(options)
    account = options.account_key(protocol, username)
    try:
        entry = cache.load(account)
        if entry is not None and entry.refresh_token:
            click.echo(_revoke_at_provider(options, entry.refresh_token))
        removed = cache.forget(account)
    finally:
        cache.close()
    click.echo(f"{mailbox}: {'cache entry deleted' if removed else 'nothing cached'}")


def _revoke_at_provider(options: AnyOAuth, refresh_token: str) -> str:
    if isinstance(options, MicrosoftOAuth):
        return (
            "Microsoft has no token revocation endpoint: revoke the user's sessions in "
            "Entra ID (Users > Revoke sessions) to invalidate the refresh token."
        )
    import requests

    from mailpipe.oauth.grant import trust

    data = {"token": refresh_token, "token_type_hint": "refresh_token",
            "client_id": options.client_id}
    auth: tuple[str, str] | None = None
    if isinstance(options, GoogleOAuth):
        url = options.token_uri.rsplit("/", 1)[0] + "/revoke"
    else:
        from mailpipe.oauth.oidc import OidcFlow

        meta = OidcFlow(options, "pop3").metadata()
        url = str(meta.get("revocation_endpoint", ""))
        if not url:
            return "the provider names no revocation_endpoint; token kept there"
        if options.client_secret is not None:
            # RFC 7009 §2.1: a confidential client authenticates its revocation,
            # with client_secret_basic unless the provider only takes _post.
            secret = options.client_secret.get()
            methods = meta.get("revocation_endpoint_auth_methods_supported") or []
            if "client_secret_basic" not in methods and "client_secret_post" in methods:
                data["client_secret"] = secret
            else:
                # RFC 6749 §2.3.1: both parts form-encoded before Basic encoding.
                auth = (quote(options.client_id, safe=""), quote(secret, safe=""))
                del data["client_id"]
    session = trust(requests.Session(), options.ca_file)
    try:
        resp = session.post(url, data=data, auth=auth, timeout=options.timeout)
    except requests.RequestException as exc:
        return f"revocation request failed ({type(exc).__name__}); token kept there"
    return f"revoked at the provider (HTTP {resp.status_code})"
