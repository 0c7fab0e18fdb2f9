"""The pop3 source's registration, options model and contract conformance."""

from __future__ import annotations

import pytest
from mailpipe.plugins.pop3.source import Pop3Options, Pop3Session, Pop3Source
from pydantic import ValidationError

from mailpipe.plugin_manager import get_plugin_manager
from mailpipe.registry import collect
from mailpipe.secrets import Secret
from mailpipe.source import Source, SourceSession


def test_registered_as_pop3():
    registry = collect(get_plugin_manager(entry_points=False))
    assert registry.source("pop3") is Pop3Source
    assert isinstance(Pop3Source(Pop3Options(host="h", username="u", password="pw")), Source)


def test_session_satisfies_source_session_protocol():
    session = Pop3Session(Pop3Options(host="h", username="u", password="pw"), "box")
    assert isinstance(session, SourceSession)
    assert session.capabilities.names == frozenset()


def test_every_option_has_a_description():
    schema = Pop3Options.model_json_schema()
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name


def test_defaults_are_secure():
    o = Pop3Options.model_validate({"host": "pop.example.com", "username": "u", "password": "pw"})
    assert (o.security, o.effective_port, o.tls_verify, o.allow_plaintext_password) == (
        "tls", 995, True, False)
    assert o.pipelining == "auto" and o.pipeline_window == 128 and o.max_line == 8192
    assert Pop3Options(host="h", username="u", password="pw", security="starttls").effective_port == 110


def test_durations_and_secrets_parse(monkeypatch):
    monkeypatch.setenv("MAILPIPE_TEST_POP3_PW", "from-env-secret")
    o = Pop3Options.model_validate(
        {"host": "h", "username": "u", "password": {"env": "MAILPIPE_TEST_POP3_PW"},
         "read_timeout": "2m", "connect_timeout": "250ms"})
    assert isinstance(o.password, Secret) and o.password.get() == "from-env-secret"
    assert o.read_timeout == 120.0 and o.connect_timeout == 0.25
    assert "from-env-secret" not in repr(o)


@pytest.mark.parametrize(
    ("table", "loc", "needle"),
    [
        ({"security": "none"}, "allow_plaintext_password", "clear text"),
        ({"auth": "xoauth2"}, "oauth_token", "oauth_token"),
        ({"password": None}, "oauth_token", "password or oauth_token"),
        ({"password": None, "oauth_token": "tok-1234", "auth": "plain"}, "auth", "needs password"),
        ({"cert_sha256": "zz"}, "cert_sha256", ""),
        ({"bogus": 1}, "bogus", ""),
        ({"security": "ssl"}, "security", ""),
    ],
)
def test_invalid_options_name_the_key_and_never_echo_secrets(table, loc, needle):
    data = {"host": "h", "username": "u", "password": "hunter2-secret", **table}
    with pytest.raises(ValidationError) as info:
        Pop3Options.model_validate(data)
    errors = info.value.errors(include_url=False)
    assert any(e["loc"] == (loc,) and needle in e["msg"] for e in errors), errors
    assert all("hunter2-secret" not in str(e.get("input")) for e in errors)


def test_plaintext_allowed_only_explicitly():
    o = Pop3Options(host="h", username="u", password="pw", security="none",
                    allow_plaintext_password=True)
    assert o.effective_port == 110
