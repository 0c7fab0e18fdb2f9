"""One loading path: open_app reads the file, chooses the plugins from it and
validates; load_config is the same path's config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mailpipe.app import disabled_plugins, load_config, open_app
from mailpipe.errors import ConfigError

PIPELINE = """
[plugins]
disable = [{disabled}]

[[mailboxes]]
name = "support"
host = "127.0.0.1"
username = "u"
password = "p"

[pipelines.default]
processors = [{{ use = "parse" }}, {{ use = "store.jsonl", path = "out.jsonl" }}]
"""


def write(tmp_path: Path, disabled: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(PIPELINE.format(disabled=disabled))
    return path


def test_open_app_and_load_config_give_the_same_config(tmp_path: Path) -> None:
    path = write(tmp_path, '"forward"')
    app = open_app(path, entry_points=False)
    config = load_config(path, entry_points=False)
    assert [m.name for m in config.mailboxes] == [m.name for m in app.config.mailboxes]
    steps = {n: [(s.step, s.cls) for s in p] for n, p in config.pipelines.items()}
    assert steps == {
        n: [(s.step, s.cls) for s in p] for n, p in app.config.pipelines.items()
    }
    assert sorted(config.registry.processors) == sorted(app.config.registry.processors)
    assert "forward.webhook" not in config.registry.processors
    assert app.pm.get_plugin("forward") is None  # blocked, not registered


@pytest.mark.parametrize("loader", [open_app, load_config], ids=["open_app", "load_config"])
def test_a_disabled_plugin_is_unknown_to_either_loader(
    tmp_path: Path, loader: Callable[..., object]
) -> None:
    with pytest.raises(ConfigError) as info:
        loader(write(tmp_path, '"parse"'), entry_points=False)
    assert "pipelines.default.processors[0].use: unknown processor 'parse'" in str(
        info.value
    )


def test_disabled_plugins_reads_the_raw_table() -> None:
    assert disabled_plugins({"plugins": {"disable": ["a", "b"]}}) == ["a", "b"]
    assert disabled_plugins({"plugins": {"disable": "a"}}) == []  # reported later
    assert disabled_plugins({}) == []
