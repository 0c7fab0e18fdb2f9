"""The oauth table: defaults, and config errors that name the key, the value and what
is accepted, never echoing a secret."""

from pathlib import Path

import pytest

from mailpipe.app import load_config
from mailpipe.errors import ConfigError
from mailpipe.oauth.options import GoogleOAuth, MicrosoftOAuth
from mailpipe.oauth.scopes import default_scopes

from .conftest import oauth

MAILBOX = """
[[mailboxes]]
name = "m{i}"
host = "pop.example.com"
username = "u@example.com"
pipeline = "p"
oauth = {{ {table} }}
"""


def _check(tmp_path: Path, *tables: str) -> list[str]:
    text = "".join(MAILBOX.format(i=i, table=t) for i, t in enumerate(tables))
    text += '[pipelines.p]\nprocessors = [{ use = "parse" }]\n'
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, entry_points=False)
    return [p.render() for p in caught.value.problems]


def test_errors_name_the_key_value_and_accepted(tmp_path: Path) -> None:
    key = 'cache_key = "k"'
    problems = _check(
        tmp_path,
        f'provider = "microsft", client_id = "x", {key}',
        f'provider = "microsoft", flow = "device_code", client_id = "x", '
        f'client_secret = "hunter2", {key}',
        'provider = "microsoft", flow = "client_credentials", client_id = "x", '
        'client_secret = "hunter2"',
        f'provider = "oidc", flow = "refresh", client_id = "x", {key}',
        f'provider = "google", flow = "service_account", {key}',
        f'provider = "microsoft", flow = "client_credentials", tenant = "contoso", '
        f'client_id = "x", {key}',
        f'client_id = "x", {key}',
    )
    assert problems == [
        "mailboxes[0].oauth.provider: Input should be 'microsoft', 'google' or 'oidc' "
        '(got "microsft")',
        "mailboxes[1].oauth.client_secret: flow = 'device_code' is a public client: "
        "remove client_secret (Microsoft refuses it, AADSTS700025) (got **********)",
        "mailboxes[2].oauth.cache_key: required key is missing",
        "mailboxes[2].oauth.tenant: flow = 'client_credentials' needs the directory "
        "(tenant) id or domain, not 'organizations' (got \"organizations\")",
        "mailboxes[3].oauth.flow: Input should be 'refresh_token' or "
        "'client_credentials' (got \"refresh\")",
        "mailboxes[3].oauth.token_endpoint: set issuer or token_endpoint "
        "(got **********)",
        "mailboxes[4].oauth.token_uri: flow = 'service_account' needs "
        "service_account_file (got **********)",
        "mailboxes[5].oauth.certificate: flow = 'client_credentials' needs "
        "client_secret or certificate (got null)",
        "mailboxes[6].oauth.provider: required key is missing",
    ]
    assert not any("hunter2" in p for p in problems)


def test_oauth_and_oauth_token_are_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        MAILBOX.format(
            i=0,
            table='provider = "oidc", flow = "refresh_token", client_id = "x", '
            'issuer = "https://idp.example", cache_key = "k"',
        ).replace("oauth = {", 'oauth_token = "tok"\noauth = {')
        + '[pipelines.p]\nprocessors = [{ use = "parse" }]\n'
    )
    with pytest.raises(ConfigError, match="oauth_token: set oauth or oauth_token"):
        load_config(path, entry_points=False)


def test_a_valid_table_knows_its_journal_and_folder(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[state]\npath = "var/j.sqlite3"\n'
        + MAILBOX.format(
            i=0,
            table='provider = "google", flow = "service_account", '
            'service_account_file = "sa.json", cache_key = "k"',
        )
        + '[pipelines.p]\nprocessors = [{ use = "parse" }]\n'
    )
    config = load_config(path, entry_points=False)
    options = config.mailboxes[0].source_options.oauth
    assert isinstance(options, GoogleOAuth)
    assert options.state_path == "var/j.sqlite3"
    assert options.service_account_file == tmp_path / "sa.json"
    assert options.effective_scopes("pop3") == ("https://mail.google.com/",)


def test_default_scopes_per_provider_flow_and_protocol() -> None:
    outlook = "https://outlook.office.com"
    assert default_scopes("microsoft", "device_code", "pop3") == (
        f"{outlook}/POP.AccessAsUser.All", "offline_access")
    assert default_scopes("microsoft", "device_code", "imap") == (
        f"{outlook}/IMAP.AccessAsUser.All", "offline_access")
    assert default_scopes("microsoft", "client_credentials", "imap") == (
        f"{outlook}/.default",)
    assert default_scopes("google", "refresh_token", "imap") == (
        "https://mail.google.com/",)
    assert default_scopes("oidc", "refresh_token", "pop3") == (
        "openid", "offline_access")


def test_scopes_are_overridable() -> None:
    options = oauth({"provider": "microsoft", "flow": "device_code", "client_id": "c",
                     "cache_key": "k", "scopes": ["custom/Mail"]})
    assert isinstance(options, MicrosoftOAuth)
    assert options.effective_scopes("pop3") == ("custom/Mail",)


@pytest.mark.parametrize(
    "options",
    ["mailpipe.plugins.pop3.source:Pop3Options", "mailpipe.plugins.imap.options:ImapOptions"],
)
def test_the_mail_options_schema_leaves_the_provider_models_to_first_use(
    options: str,
) -> None:
    """Issue 18: building a POP3/IMAP mailbox's options (every start-up) does not build
    the three provider models into its schema; the table is still validated then, by
    the provider's model (the tests above)."""
    import importlib

    module, _, name = options.partition(":")
    model = getattr(importlib.import_module(module), name)
    model.model_rebuild()
    schema = repr(model.__pydantic_core_schema__)
    assert "oauth" in schema
    assert not any(m in schema for m in ("MicrosoftOAuth", "GoogleOAuth", "OidcOAuth"))
