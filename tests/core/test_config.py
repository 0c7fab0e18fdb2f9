"""Config loading: every problem at once, key paths, values, suggestions, secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict, Field

from mailpipe.app import load_config
from mailpipe.errors import ConfigError
from mailpipe.registry import Registry
from mailpipe.schema import json_schema
from mailpipe.secrets import Secret


class SrcOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = Field(description="host")
    port: int = Field(995, ge=1, le=65535, description="port")
    password: Secret | None = Field(None, description="password")
    security: str = Field("tls", pattern="^(tls|starttls|none)$", description="mode")


class Src:
    name: ClassVar[str] = "pop3"
    Options: ClassVar[type[BaseModel]] = SrcOptions

    def session(self) -> Any:  # pragma: no cover - never called
        raise NotImplementedError


class ProcOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field("x", description="path")


class Proc:
    name: ClassVar[str] = "filter"
    Options: ClassVar[type[BaseModel]] = ProcOptions

    def process(self, message: Any) -> None:  # pragma: no cover
        return None


@pytest.fixture
def registry() -> Registry:
    r = Registry()
    r.add("source", Src, "t")
    r.add("processor", Proc, "t")
    return r


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pipeline.toml"
    p.write_text(text)
    return p


GOOD = """
[[mailboxes]]
name = "support"
host = "pop.example.com"
password = { env = "MP_TEST_PW" }
poll_interval = "5m"
max_message_size = "50MB"

[pipelines.default]
processors = [{ use = "filter", path = "a" }]
"""


def test_good_config_loads(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MP_TEST_PW", "hunter2-secret")
    cfg = load_config(write(tmp_path, GOOD), registry=registry)
    mb = cfg.mailboxes[0]
    assert mb.config.poll_interval == 300.0
    assert mb.config.max_message_size == 50_000_000
    assert mb.source_options.password.get() == "hunter2-secret"  # type: ignore[attr-defined]
    assert "hunter2" not in repr(mb.source_options)
    assert cfg.pipelines["default"][0].step == "0:filter"


def test_four_problems_in_one_report(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MP_MISSING_PW", raising=False)
    text = """
[[mailboxes]]
name = "support"
host = "pop.example.com"
port = 99999
pol_interval = "60s"
password = { env = "MP_MISSING_PW" }

[pipelines.default]
processors = [{ use = "fliter" }]
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), registry=registry)
    report = str(info.value)
    assert report.startswith(f"{tmp_path / 'pipeline.toml'}: 4 problems")
    assert (
        "mailboxes[0].port: Input should be less than or equal to 65535 (got 99999)"
        in report
    )
    assert (
        "mailboxes[0].pol_interval: unknown key; did you mean 'poll_interval'?"
        in report
    )
    assert (
        "mailboxes[0].password: environment variable MP_MISSING_PW is not set" in report
    )
    assert (
        "pipelines.default.processors[0].use: unknown processor 'fliter'; did you mean 'filter'?"
        in report
    )


def test_enum_lists_accepted_values(tmp_path: Path, registry: Registry) -> None:
    text = """
[[mailboxes]]
name = "a"
host = "h"
on_oversize = "explode"
delete = "sometimes"
on_uidl_reset = "ignore"
[pipelines.default]
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), registry=registry)
    report = str(info.value)
    assert (
        "mailboxes[0].on_oversize: Input should be 'skip', 'quarantine' or 'delete' (got \"explode\")"
        in report
    )
    assert (
        "mailboxes[0].delete: expected 'after_processing', 'never' or 'after_days:N' (got \"sometimes\")"
        in report
    )
    assert (
        "mailboxes[0].on_uidl_reset: Input should be 'stop' or 'ingest' (got \"ignore\")"
        in report
    )


def test_toml_syntax_error_has_line_and_column(
    tmp_path: Path, registry: Registry
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[state]\npath = \n"), registry=registry)
    assert "line 2" in str(info.value) and "column" in str(info.value)


def test_bad_duration_and_size(tmp_path: Path, registry: Registry) -> None:
    text = """
[[mailboxes]]
name = "a"
host = "h"
poll_interval = "soon"
max_message_size = "huge"
[pipelines.default]
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), registry=registry)
    report = str(info.value)
    assert "mailboxes[0].poll_interval: expected a duration such as '30s'" in report
    assert "mailboxes[0].max_message_size: expected a size such as '50MB'" in report


def test_unknown_pipeline_and_duplicate_names(
    tmp_path: Path, registry: Registry
) -> None:
    text = """
[[mailboxes]]
name = "a"
host = "h"
pipeline = "tickts"
[pipelines.tickets]
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), registry=registry)
    assert (
        "mailboxes[0].pipeline: no [pipelines.tickts] table; did you mean 'tickets'?"
        in str(info.value)
    )


def test_unknown_top_level_key_suggests(tmp_path: Path, registry: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            write(tmp_path, "[schedular]\nconcurrency = 2\n"), registry=registry
        )
    assert "schedular: unknown key; did you mean 'scheduler'?" in str(info.value)


def test_inline_secret_never_shown_in_report(
    tmp_path: Path, registry: Registry
) -> None:
    text = """
[[mailboxes]]
name = "a"
host = "h"
password = "s3cr3t-value-xyz"
port = 0
[pipelines.default]
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), registry=registry)
    assert "s3cr3t-value-xyz" not in str(info.value)
    assert "s3cr3t-value-xyz" not in repr(info.value)


def test_secret_file_relative_to_config(tmp_path: Path, registry: Registry) -> None:
    (tmp_path / "pw.txt").write_text("from-a-file\n")
    text = GOOD.replace('{ env = "MP_TEST_PW" }', '{ file = "pw.txt" }')
    cfg = load_config(write(tmp_path, text), registry=registry)
    assert cfg.mailboxes[0].source_options.password.get() == "from-a-file"  # type: ignore[attr-defined]


def test_schema_includes_plugin_options(registry: Registry) -> None:
    schema = json_schema(registry)
    mb = schema["$defs"]["MailboxConfig"]["anyOf"][0]
    assert {"host", "port", "poll_interval", "name"} <= set(mb["properties"])
    proc = schema["$defs"]["ProcessorRef"]["anyOf"][0]
    assert proc["properties"]["use"] == {
        "const": "filter",
        "description": "Processor name.",
    }
    assert mb["additionalProperties"] is False
