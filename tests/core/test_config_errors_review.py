"""Config review: realistic mistakes, each reported with key path, value and what is
accepted, all at once, with exit code 2 from ``mailpipe check``."""

from __future__ import annotations

import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, BeforeValidator, PlainValidator
from pydantic.types import Strict

from mailpipe.app import load_config
from mailpipe.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

MISTAKES = """
[state]
pth = "var/j.sqlite3"

[scheduler]
concurrency = "four"
spool_threshold = "1 megabyte"
backoff_max = "10 parsecs"

[[mailboxes]]
name = "support"
host = "pop.example.com"
username = "u"
password = { file = "missing.password" }
security = "ssl"
port = 99999
poll_interval = "sixty"
delete = "after_day:3"
pipeline = "tikets"
hots = "x"

[[mailboxes]]
name = "support"
host = "pop.example.com"
username = "u"
password = { command = ["false"] }
pipeline = "tickets"

[[mailboxes]]
name = "other"
host = "pop.example.com"
username = "u"
password = { env = "MAILPIPE_REVIEW_UNSET_VAR" }
pipeline = "nope"
on_oversize = "explode"
max_message_size = -5

[pipelines.tickets]
on_complete = "finish"
processors = [
  { use = "parse", bogus = 1 },
  { use = "filter", rules = [{ name = "r", when = { from_domian = ["x"] }, then = "drop" }, { name = "r2", when = { mailing_list = true }, then = "explode" }] },
  { use = "store.sqlite", path = 5 },
  { use = "store.jsonl" },
  { use = "store.sqlit", path = "x" },
  { use = "forward.smtp", host = "smtp.example.com", to = ["a@b.c"], envelope_from = "x@y.z", security = "startls" },
  { use = "forward.webhook", url = "ftp://x" },
  { use = "store.attachments", dir = "a", max_size = "lots" },
]
"""

# (expected line fragment) — each names the key path, the value and what is accepted.
EXPECTED = [
    "state.pth: unknown key; did you mean 'path'?",
    'scheduler.concurrency: expected an integer (got "four")',
    "scheduler.spool_threshold: expected a size such as '50MB'",
    "scheduler.backoff_max: expected a duration such as '30s'",
    "mailboxes[0].poll_interval: expected a duration such as '30s'",
    "mailboxes[0].delete: expected 'after_processing', 'never' or 'after_days:N' "
    '(got "after_day:3")',
    "mailboxes[0].port: Input should be less than or equal to 65535 (got 99999)",
    "mailboxes[0].security: Input should be 'tls', 'starttls' or 'none' (got \"ssl\")",
    "mailboxes[0].password: cannot read secret file",
    "mailboxes[0].hots: unknown key; did you mean 'host'?",
    "mailboxes[0].pipeline: no [pipelines.tikets] table; did you mean 'tickets'?",
    "mailboxes[1].name: mailbox name already used by mailboxes[0]",
    "mailboxes[1].password: secret command 'false' exited 1",
    "mailboxes[2].password: environment variable MAILPIPE_REVIEW_UNSET_VAR is not set",
    "mailboxes[2].pipeline: no [pipelines.nope] table; Defined: tickets.",
    "mailboxes[2].on_oversize: Input should be 'skip', 'quarantine' or 'delete' "
    '(got "explode")',
    "mailboxes[2].max_message_size: a size cannot be negative (got -5)",
    "pipelines.tickets.on_complete: Input should be 'done' or 'keep' (got \"finish\")",
    "pipelines.tickets.processors[0].bogus: unknown key; accepted:",
    "pipelines.tickets.processors[1].rules[0].when.from_domian: rule 'r': unknown "
    "condition 'from_domian'; known:",
    "pipelines.tickets.processors[1].rules[1].then: rule 'r2': unknown action "
    "'explode'; expected drop, keep",
    "pipelines.tickets.processors[2].path:",
    "pipelines.tickets.processors[3].path: required key is missing",
    "pipelines.tickets.processors[4].use: unknown processor 'store.sqlit'; did you "
    "mean 'store.sqlite'?",
    "pipelines.tickets.processors[5].security: Input should be 'tls', 'starttls' or "
    "'none' (got \"startls\")",
    "pipelines.tickets.processors[6].url: expected an http:// or https:// URL",
    "pipelines.tickets.processors[7].max_size: expected a size such as '50MB'",
]


def _write(tmp_path: Path, text: str, name: str = "pipeline.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_mistake_is_reported_at_once_with_its_exact_key_path(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, MISTAKES))
    report = str(info.value)
    missing = [e for e in EXPECTED if e not in report]
    assert not missing, report
    assert report.startswith(f"{tmp_path / 'pipeline.toml'}: {len(EXPECTED)} problems")


def test_mailpipe_check_prints_them_all_and_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mailpipe", "check", str(_write(tmp_path, MISTAKES))],
        capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 2
    assert all(e in done.stderr for e in EXPECTED), done.stderr
    assert "Traceback" not in done.stderr


def test_a_mailbox_with_a_core_mistake_still_has_its_source_options_checked(
    tmp_path: Path,
) -> None:
    # Before the review, one bad core key dropped the whole mailbox from phase 2 and
    # later mailboxes were reported under the wrong index.
    text = """
[[mailboxes]]
name = "a"
host = "h"
username = "u"
password = "pw-1234"
poll_interval = "soon"
[[mailboxes]]
name = "b"
host = "h"
username = "u"
pasword = "pw-1234"
[pipelines.default]
"""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    report = str(info.value)
    assert "mailboxes[0].poll_interval" in report
    assert "mailboxes[1].pasword: unknown key; did you mean 'password'?" in report
    assert "mailboxes[0].pasword" not in report


def test_invalid_toml_names_line_and_column(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mailpipe", "check",
         str(_write(tmp_path, '[[mailboxes]]\nname = "a\nhost = "h"\n'))],
        capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 2
    assert "TOML syntax error" in done.stderr and "line 2" in done.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mailpipe", "check", str(tmp_path / "nope.toml")],
        capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 2 and "file not found" in done.stderr


# Issue 20 item 10: a value of the wrong TOML type is refused, never coerced; so is a
# zero timeout.
MAILBOX = """
[[mailboxes]]
name = "box"
host = "pop.example.com"
username = "u"
password = "pw-1234"
{extra}
[pipelines.default]
"""

TYPE_MISTAKES = [
    ('port = "110"',
     'mailboxes[0].port: expected an integer; write 110 without quotes (got "110")'),
    ("port = 110.0", "mailboxes[0].port: expected an integer (got 110.0)"),
    ('max_attempts = "3"',
     'mailboxes[0].max_attempts: expected an integer; write 3 without quotes '
     '(got "3")'),
    ('enabled = "yes"', 'mailboxes[0].enabled: expected true or false (got "yes")'),
    ('tls_verify = "false"',
     'mailboxes[0].tls_verify: expected true or false; write false without quotes '
     '(got "false")'),
    ('jitter = "0.5"',
     'mailboxes[0].jitter: expected a number; write 0.5 without quotes '
     '(got "0.5")'),
    ("connect_timeout = 0",
     "mailboxes[0].connect_timeout: Input should be greater than 0 (got 0)"),
    ('read_timeout = "0s"',
     'mailboxes[0].read_timeout: Input should be greater than 0 (got "0s")'),
    ("greeting_timeout = 0",
     "mailboxes[0].greeting_timeout: Input should be greater than 0 (got 0)"),
    ("tls_timeout = 0",
     "mailboxes[0].tls_timeout: Input should be greater than 0 (got 0)"),
]


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("[schedular]\nconcurrency = 2\n", "schedular: unknown key; did you mean "
         "'scheduler'?"),
        ("[scheduler]\nconcurency = 2\n", "scheduler.concurency: unknown key; did you "
         "mean 'concurrency'?"),
        ("[pipelines.default]\non_complte = 'keep'\n",
         "pipelines.default.on_complte: unknown key; did you mean 'on_complete'?"),
        ('[pipelines."a b"]\n', 'pipelines."a b": a pipeline name is 1-64 of'),
        ("[metrics]\nlisten = 'localhost'\n", "metrics.listen: String should match"),
        ("mailboxes = 3\n", "mailboxes: Input should be a valid list (got 3)"),
        ("[pipelines.default]\nprocessors = [{ name = 'x' }]\n",
         "pipelines.default.processors[0].use: required key is missing"),
        *((MAILBOX.format(extra=extra), expected) for extra, expected in TYPE_MISTAKES),
    ],
)
def test_core_mistakes_name_their_key(
    tmp_path: Path, snippet: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, snippet))
    assert expected in str(info.value)


def test_integers_and_floats_of_the_right_type_still_pass(tmp_path: Path) -> None:
    extra = "port = 110\njitter = 0\nmax_attempts = 3\nenabled = true\nread_timeout = 5"
    config = load_config(_write(tmp_path, MAILBOX.format(extra=extra)))
    box = config.mailboxes[0]
    assert box.source_options.port == 110  # type: ignore[attr-defined]
    assert box.config.jitter == 0.0 and box.config.max_attempts == 3


def _models(root: type[BaseModel]) -> Iterator[type[BaseModel]]:
    """``root`` and every model its fields nest (through lists, dicts and unions)."""
    seen: set[type[BaseModel]] = set()
    todo = [root]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        yield model
        for info in model.model_fields.values():
            todo += [t for t in _leaves(info.annotation) if _is_model(t)]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _leaves(tp: Any) -> list[Any]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Annotated:
        return _leaves(args[0])
    if args:
        return [leaf for a in args for leaf in _leaves(a)]
    return [tp]


def _lax_leaves(tp: Any) -> list[Any]:
    """The bare int, float and bool types inside ``tp`` that pydantic would coerce from
    a string ("110", "yes"): neither strict nor parsed by a validator of ours."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Annotated:
        checked = (BeforeValidator, PlainValidator, Strict)
        if any(isinstance(m, checked) for m in tp.__metadata__):
            return []
        return _lax_leaves(args[0])
    if args:
        return [leaf for a in args for leaf in _lax_leaves(a)]
    return [tp] if tp in (int, float, bool) else []


def _lax_scalar_fields(model: type[BaseModel]) -> list[str]:
    lax = []
    for name, info in model.model_fields.items():
        tp = info.annotation
        if any(isinstance(m, BeforeValidator | PlainValidator) for m in info.metadata):
            continue
        # Field(strict=True) reaches a scalar (or an optional one), not list items.
        container = typing.get_origin(tp) not in (None, typing.Union, types.UnionType)
        if not container and any(isinstance(m, Strict) for m in info.metadata):
            continue
        if _lax_leaves(tp):
            lax.append(f"{model.__name__}.{name}")
    return lax


def test_no_config_number_or_boolean_is_coerced_from_a_string() -> None:
    from mailpipe.config import ConfigModel
    from mailpipe.plugin_manager import load

    _, registry = load(entry_points=False)
    roots: list[type[BaseModel]] = [ConfigModel]
    roots += [e.cls.Options for e in registry.sources.values()]
    roots += [e.cls.Options for e in registry.processors.values()]
    lax = sorted({f for root in roots for m in _models(root) for f in _lax_scalar_fields(m)})
    assert not lax, lax


@pytest.mark.parametrize(
    "step",
    [
        '{ use = "forward.webhook", url = "https://h.example/x", timeout = 0 }',
        '{ use = "forward.smtp", host = "h", to = ["a@b.c"], envelope_from = "x@y.z", '
        "timeout = 0 }",
        '{ use = "forward.command", command = ["true"], timeout = "0s" }',
        '{ use = "forward.redis", url = "redis://h", stream = "s", timeout = 0 }',
    ],
)
def test_a_forwarder_timeout_of_zero_is_refused(tmp_path: Path, step: str) -> None:
    text = f"[pipelines.default]\nprocessors = [{step}]\n"
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    written = step.rsplit("timeout = ", 1)[1].rstrip(" }")
    expected = f"processors[0].timeout: Input should be greater than 0 (got {written})"
    assert expected in str(info.value)


def test_a_wrongly_shaped_acknowledgement_is_one_problem_naming_what_is_accepted(
    tmp_path,
) -> None:
    import pytest

    from mailpipe.errors import ConfigError
    from mailpipe.plugin_manager import load
    from mailpipe.validation import validate_config

    data = {
        "mailboxes": [{"name": "a", "host": "h", "username": "u", "password": "p",
                       "acknowledge": "keep", "on_quarantine": {"copy": "x"}}],
        "pipelines": {"default": {"processors": [{"use": "parse"}]}},
    }
    with pytest.raises(ConfigError) as caught:
        validate_config(data, path=tmp_path / "p.toml", registry=load(entry_points=False)[1])
    lines = str(caught.value).splitlines()[1:]
    assert len(lines) == 2, lines
    lines = [line.strip() for line in lines]
    assert any(line.startswith('mailboxes[0].acknowledge: expected "delete", '
                               '{ move = "Folder" }, { flag = "$Flag" } (got "keep")')
               for line in lines), lines
    assert any(line.startswith('mailboxes[0].on_quarantine: expected "delete", "keep", '
                               '{ move = "Folder" }') for line in lines), lines
