"""The README stays true: generated reference in sync, commands exist, TOML parses."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailpipe.cli import cli
from mailpipe.plugin_manager import load
from mailpipe.reference import END, START, render
from mailpipe.validation import validate_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}[^\n]*\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


def test_reference_matches_the_models() -> None:
    _, registry = load(entry_points=False)
    inside = README.split(START, 1)[1].split(END, 1)[0]
    assert inside.strip() == render(registry).strip(), (
        "README reference is stale: regenerate with `python -m mailpipe.reference --write README.md`"
    )


@pytest.mark.parametrize(
    "options",
    ["mailpipe.plugins.pop3.source:Pop3Options", "mailpipe.plugins.imap.options:ImapOptions"],
)
def test_reference_calls_the_oauth_field_an_oauth_table(options: str) -> None:
    """The ``oauth`` field's type is ``mailpipe.oauth.table.OAuthOptions`` (issue 18):
    the reference still says what a user writes, not the pydantic plumbing."""
    import importlib

    from mailpipe.reference import _type

    module, _, name = options.partition(":")
    model = getattr(importlib.import_module(module), name)
    assert _type(model.model_fields["oauth"]) == "oauth table"


def test_reference_splice_replaces_only_the_marked_part() -> None:
    from mailpipe.reference import splice

    text = f"intro\n{START}\nold\n{END}\noutro\n"
    assert splice(text, "new table\n") == f"intro\n{START}\n\nnew table\n\n{END}\noutro\n"


def _commands() -> list[list[str]]:
    out = []
    for block in blocks("sh"):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = part.split()
                if words[:1] == ["mailpipe"]:
                    out.append(words[1:])
    return out


def test_readme_shows_commands() -> None:
    names = {c[0] for c in _commands() if c}
    assert {"demo", "check", "run"} <= names


@pytest.mark.parametrize("words", _commands(), ids=lambda w: " ".join(w))
def test_every_readme_command_exists(words: list[str]) -> None:
    path = [
        w
        for w in words
        if (not w.startswith("-") and w.isidentifier()) or w in ("mark-seen",)
    ]
    group: object = cli
    used: list[str] = []
    for word in path:
        sub = getattr(group, "commands", {}).get(word)
        if sub is None:
            break
        used.append(word)
        group = sub
    assert used, f"unknown command: mailpipe {' '.join(words)}"
    result = CliRunner().invoke(cli, [*used, "--help"])
    assert result.exit_code == 0, result.output


def test_readme_toml_snippets_parse_and_validate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SUPPORT_POP3_PASSWORD", "x" * 8)
    monkeypatch.setenv("SUPPORT_IMAP_PASSWORD", "x" * 8)
    monkeypatch.setenv("MAILPIPE_OAUTH_KEY", "k" * 8)  # cache_key of the OAuth examples
    _, registry = load(entry_points=False)
    snippets = blocks("toml")
    assert snippets
    for text in snippets:
        data = tomllib.loads(text)
        if "mailboxes" not in data:
            continue
        for mb in data["mailboxes"]:
            if (
                isinstance(mb.get("oauth_token"), dict)
                and "command" in mb["oauth_token"]
            ):
                mb["oauth_token"] = {"command": ["echo", "token-for-test"]}
        data.setdefault("pipelines", {}).setdefault("tickets", {"processors": []})
        validate_config(data, path=ROOT / "readme-snippet.toml", registry=registry)
