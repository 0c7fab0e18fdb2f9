"""Every TOML example in docs/ parses, and the filter guide's pipeline validates."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from mailpipe.plugin_manager import load
from mailpipe.validation import validate_config

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _blocks(path: Path) -> list[str]:
    return re.findall(r"^```toml[^\n]*\n(.*?)^```", path.read_text(), re.M | re.S)


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_toml_blocks_parse(path: Path) -> None:
    for block in _blocks(path):
        tomllib.loads(block)


def test_filter_guide_pipeline_validates() -> None:
    _, registry = load(entry_points=False)
    data = tomllib.loads(_blocks(DOCS / "filter.md")[0])
    cfg = validate_config(data, path=DOCS / "x.toml", registry=registry)
    assert [s.use for s in cfg.pipelines["tickets"]] == ["parse", "filter", "store.sqlite"]
