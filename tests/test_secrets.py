"""Secrets: env/file/command sources, masking everywhere, and redaction."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mailpipe.secrets import (
    MASK,
    Secret,
    known_secret_values,
    mask_url_passwords,
    redact,
    remember_secret,
)


def unique(prefix: str = "s3cr3t") -> str:
    """A value no other test uses, so the process-wide redaction set can't mislead."""
    return f"{prefix}-{uuid.uuid4().hex}"


class Account(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(description="login")
    password: Secret = Field(description="password")


def test_inline_string(monkeypatch: pytest.MonkeyPatch) -> None:
    value = unique()
    secret = Secret(value)
    assert secret.get() == value
    assert secret.origin == "inline"


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    value = unique()
    monkeypatch.setenv("MP_TEST_SECRET_ENV", value)
    secret = Secret({"env": "MP_TEST_SECRET_ENV"})
    assert secret.get() == value
    assert secret.origin == "env"


def test_missing_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MP_TEST_SECRET_UNSET", raising=False)
    with pytest.raises(ValueError, match="environment variable MP_TEST_SECRET_UNSET is not set"):
        Secret({"env": "MP_TEST_SECRET_UNSET"})


@pytest.mark.parametrize("bad", ["", 5, None])
def test_env_needs_a_variable_name(bad: object) -> None:
    with pytest.raises(ValueError, match="'env' takes the name of an environment variable"):
        Secret({"env": bad})


def test_from_file_relative_to_base_dir_strips_line_end(tmp_path: Path) -> None:
    value = unique()
    (tmp_path / "pw.txt").write_text(value + "\r\n")
    secret = Secret({"file": "pw.txt"}, base_dir=tmp_path)
    assert secret.get() == value
    assert secret.origin == "file"


def test_from_file_keeps_inner_whitespace(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(" two words \n")
    assert Secret({"file": str(tmp_path / "pw")}).get() == " two words "


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read secret file .*nope\.txt"):
        Secret({"file": "nope.txt"}, base_dir=tmp_path)


def test_from_command(tmp_path: Path) -> None:
    value = unique("token")
    secret = Secret({"command": [sys.executable, "-c", f"print({value!r})"]})
    assert secret.get() == value
    assert secret.origin == "command"


def test_command_refresh_runs_the_helper_again(tmp_path: Path) -> None:
    # An OAuth token helper: each run prints a new token.
    counter = tmp_path / "n"
    counter.write_text("0")
    script = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
        "n = int(p.read_text()) + 1; p.write_text(str(n)); print(f'tok-{n}-abcdef')"
    )
    secret = Secret({"command": [sys.executable, "-c", script, str(counter)]})
    assert secret.get() == "tok-1-abcdef"
    assert secret.refresh() == "tok-2-abcdef"
    assert secret.get() == "tok-2-abcdef"
    assert "tok-2-abcdef" in known_secret_values()


def test_refresh_of_non_command_secret_keeps_value() -> None:
    value = unique()
    secret = Secret(value)
    assert secret.refresh() == value


def test_failing_command_reports_exit_code_but_not_its_output() -> None:
    leaked = unique("leak")
    script = f"import sys; print({leaked!r}); sys.stderr.write({leaked!r}); sys.exit(3)"
    with pytest.raises(ValueError) as info:
        Secret({"command": [sys.executable, "-c", script]})
    assert "exited 3" in str(info.value)
    assert leaked not in str(info.value)
    assert info.value.__cause__ is None


def test_missing_command_program_is_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"secret command .* failed: FileNotFoundError"):
        Secret({"command": [str(tmp_path / "no-such-helper")]})


@pytest.mark.parametrize("bad", [[], [1, 2], 5])
def test_command_needs_a_list_of_strings(bad: object) -> None:
    with pytest.raises(ValueError, match="'command' takes a program"):
        Secret({"command": bad})


@pytest.mark.parametrize(
    "bad",
    [{}, {"env": "A", "file": "b"}, 42, None, ["x"]],
    ids=repr,
)
def test_bad_spec_shapes(bad: object) -> None:
    with pytest.raises(ValueError, match="exactly one of 'env', 'file' or 'command'"):
        Secret(bad)


def test_unknown_source_kind_lists_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="unknown secret source 'vault'; accepted: env, file"):
        Secret({"vault": "x"})


def test_repr_and_str_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    value = unique()
    monkeypatch.setenv("MP_TEST_SECRET_REPR", value)
    secret = Secret({"env": "MP_TEST_SECRET_REPR"})
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret])):
        assert value not in text
        assert MASK in text
    assert repr(secret) == f"Secret(env, {MASK})"


def test_equality_and_hash_follow_the_value() -> None:
    value = unique()
    assert Secret(value) == Secret(value)
    assert hash(Secret(value)) == hash(Secret(value))
    assert Secret(value) != Secret(unique())
    assert Secret(value) != value


def test_model_field_validates_with_base_dir_context(tmp_path: Path) -> None:
    value = unique()
    (tmp_path / "pw").write_text(value)
    account = Account.model_validate(
        {"user": "bob", "password": {"file": "pw"}}, context={"base_dir": str(tmp_path)}
    )
    assert account.password.get() == value
    # A Secret instance passes through unchanged.
    again = Account(user="bob", password=account.password)
    assert again.password is account.password


def test_model_repr_dump_and_json_never_show_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    value = unique()
    monkeypatch.setenv("MP_TEST_SECRET_MODEL", value)
    account = Account.model_validate({"user": "bob", "password": {"env": "MP_TEST_SECRET_MODEL"}})
    assert value not in repr(account)
    assert value not in str(account)
    assert account.model_dump() == {"user": "bob", "password": {"origin": "env"}}
    assert value not in account.model_dump_json()
    assert json.loads(account.model_dump_json())["password"] == {"origin": "env"}


def test_model_error_for_missing_env_names_variable_and_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MP_TEST_SECRET_GONE", raising=False)
    with pytest.raises(ValidationError) as info:
        Account.model_validate({"user": "bob", "password": {"env": "MP_TEST_SECRET_GONE"}})
    (error,) = info.value.errors()
    assert error["loc"] == ("password",)
    assert "MP_TEST_SECRET_GONE is not set" in error["msg"]


def test_json_schema_describes_every_form() -> None:
    schema = Account.model_json_schema()
    password = schema["properties"]["password"]
    required = [
        alt["required"] for alt in password["anyOf"] if alt.get("type") == "object"
    ]
    assert sorted(required) == [["command"], ["env"], ["file"]]
    assert {"type": "string"} in password["anyOf"]


def test_redact_masks_every_resolved_secret_inside_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = unique("alpha"), unique("beta")
    monkeypatch.setenv("MP_TEST_SECRET_A", a)
    Secret({"env": "MP_TEST_SECRET_A"})
    Secret(b)
    text = f"login failed: user=bob pass={a} token={b}; again {a}"
    out = redact(text)
    assert a not in out
    assert b not in out
    assert out == f"login failed: user=bob pass={MASK} token={MASK}; again {MASK}"


def test_redact_prefers_the_longest_overlapping_secret() -> None:
    short = unique("ovl")
    long = short + "-extended"
    remember_secret(short)
    remember_secret(long)
    assert redact(f"[{long}]") == f"[{MASK}]"


def test_redact_leaves_other_text_alone() -> None:
    text = f"nothing secret here {uuid.uuid4().hex}"
    assert redact(text) == text


def test_short_secrets_are_masked_where_they_stand_alone() -> None:
    # Issue 20 item 8: values under 4 characters used to be skipped.
    Secret("x1z")
    assert redact("user=bob pass=x1z") == f"user=bob pass={MASK}"
    assert redact("ax1zb x1z2") == "ax1zb x1z2"  # inside other words: not the secret


def test_a_common_word_as_password_leaves_other_words_alone() -> None:
    # Issue 20 item 8: substring masking turned "mailbox" into "**********box".
    Secret("mail")
    text = "mailbox support: mailpipe login with mail failed; Email"
    assert redact(text) == f"mailbox support: mailpipe login with {MASK} failed; Email"


def test_a_secret_next_to_punctuation_or_an_escape_is_masked() -> None:
    value = unique("pw")
    Secret(value)
    for text in (
        f"PASS {value}\r\n",
        f"u:{value}@h",
        f'"{value}"',
        repr(f"line\n{value}\tend"),  # quoted by repr: \n and \t precede and follow
        repr(f"\x00user\x00{value}".encode()),  # AUTH PLAIN before base64
        json.dumps(f"caf\u00e9{value}"),
    ):
        assert value not in redact(text), text


# --- refresh_async: the OAuth helper off the event loop (issue 20 item 5) -----------


async def test_refresh_async_runs_the_helper_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    """The helper waits for a file that only the event loop creates: it can finish
    only if the loop kept running while it ran."""
    marker = tmp_path / "marker"
    script = (
        "import pathlib, sys, time\n"
        "p = pathlib.Path(sys.argv[1])\n"
        "if pathlib.Path(sys.argv[2]).exists():\n"
        "    for _ in range(1000):\n"
        "        if p.exists(): break\n"
        "        time.sleep(0.01)\n"
        "print('tok-saw-marker' if p.exists() else 'tok-gave-up')\n"
        "pathlib.Path(sys.argv[2]).touch()\n"
    )
    first = tmp_path / "first-run-done"
    secret = Secret({"command": [sys.executable, "-c", script, str(marker), str(first)]})
    assert secret.get() == "tok-gave-up" or secret.get() == "tok-saw-marker"

    async def meanwhile() -> None:
        await asyncio.sleep(0)
        marker.write_text("x")

    token, _ = await asyncio.gather(secret.refresh_async(), meanwhile())
    assert token == "tok-saw-marker"
    assert "tok-saw-marker" in known_secret_values()


async def test_refresh_async_kills_a_helper_past_its_timeout(tmp_path: Path) -> None:
    leaked = unique("leak")
    done = tmp_path / "done"
    script = (
        "import pathlib, sys, time\n"
        f"print({leaked!r}, flush=True)\n"
        "p = pathlib.Path(sys.argv[1])\n"
        "if p.exists(): time.sleep(60)\n"
        "p.touch()\n"
    )
    secret = Secret({"command": [sys.executable, "-c", script, str(done)]})
    with pytest.raises(ValueError, match=r"timed out after 0\.2 s") as info:
        await secret.refresh_async(timeout=0.2)
    assert leaked not in str(info.value) and info.value.__cause__ is None


async def test_refresh_async_failure_reports_exit_code_but_not_its_output(
    tmp_path: Path,
) -> None:
    leaked = unique("leak")
    flag = tmp_path / "flag"
    script = (
        "import pathlib, sys\n"
        "p = pathlib.Path(sys.argv[1])\n"
        f"if p.exists(): print({leaked!r}); sys.stderr.write({leaked!r}); sys.exit(3)\n"
        "p.touch(); print('first')\n"
    )
    secret = Secret({"command": [sys.executable, "-c", script, str(flag)]})
    with pytest.raises(ValueError) as info:
        await secret.refresh_async()
    assert "exited 3" in str(info.value) and leaked not in str(info.value)
    assert secret.get() == "first"


def test_a_secret_after_a_percent_escape_is_masked() -> None:
    # Review of issue 20 item 8: "%3A" ends in a hex digit, a word character.
    value = unique("pct")
    Secret(value)
    assert value not in redact(f"tok=user%3A{value}&x=1")


def test_a_raw_at_sign_in_a_url_password_is_masked_whole() -> None:
    # Review of issue 20 item 8: "p@ss" leaked "ss" and made "p" a secret of its own.
    password = "p@ss-" + unique("at")
    remember_secret(f"postgresql://u:{password}@db.example/x")
    assert password in known_secret_values() and "p" not in known_secret_values()
    text = mask_url_passwords(f"postgresql://u:{password}@db.example/x")
    assert text == f"postgresql://u:{MASK}@db.example/x"


def test_many_secrets_compile_the_pattern_once(monkeypatch) -> None:
    # 200 mailboxes made start-up quadratic: the pattern was recompiled per secret.
    import re as real_re
    import types

    import mailpipe.secrets as secrets_module

    compiles: list[str] = []

    def counting_compile(pattern, flags=0):
        compiles.append(pattern)
        return real_re.compile(pattern, flags)

    fake_re = types.SimpleNamespace(**{k: getattr(real_re, k) for k in dir(real_re)
                                       if not k.startswith("__")})
    fake_re.compile = counting_compile
    monkeypatch.setattr(secrets_module, "re", fake_re)
    secrets_module.forget_secrets()
    for i in range(500):
        secrets_module.remember_secret(f"pw-{i:04d}-mailbox")
    assert compiles == []
    assert secrets_module.redact("x pw-0007-mailbox y") == f"x {secrets_module.MASK} y"
    assert secrets_module.redact("pw-0499-mailbox") == secrets_module.MASK
    assert len(compiles) == 1
    secrets_module.remember_secret("one-more-secret")
    assert secrets_module.redact("one-more-secret") == secrets_module.MASK
    assert len(compiles) == 2
    secrets_module.forget_secrets()
