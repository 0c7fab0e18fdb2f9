"""Fixtures shared by the helpdesk processor tests (reply, ticket, bounce, unwrap,
extract): a message factory, processors built from TOML-like options, the corpus."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailpipe.message import Message, MessageRef
from mailpipe.plugin_manager import get_plugin_manager
from mailpipe.processor import ProcessorContext
from mailpipe.registry import collect

CORPUS = Path(
    os.environ.get("MAILPIPE_CORPUS")
    or Path(__file__).resolve().parents[3] / "shared" / "corpus"
)


@pytest.fixture
def make_message() -> Callable[[bytes], Message]:
    """``make_message(raw)``: a fetched message of mailbox "mb"."""

    def make(raw: bytes) -> Message:
        return Message(ref=MessageRef(mailbox="mb", number=1, uid="u1", size=len(raw)),
                       data=raw)

    return make


@pytest.fixture(scope="session")
def processor() -> Callable[..., Any]:
    """``processor(name, **options)``: the registered class, options validated as
    the config loader does, built with a default context."""
    registry = collect(get_plugin_manager(entry_points=False))

    def build(name: str, **options: Any) -> Any:
        cls = registry.processor(name)
        return cls(cls.Options.model_validate(options), ProcessorContext())

    return build


@pytest.fixture
def corpus_files() -> list[Path]:
    """Every file of ../shared/corpus; skipped when absent, a failure in CI."""
    if not (CORPUS / "MANIFEST.tsv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"corpus not found at {CORPUS}; CI provides ../shared/corpus")
        pytest.skip(f"corpus not found at {CORPUS} (set MAILPIPE_CORPUS)")
    with (CORPUS / "MANIFEST.tsv").open(encoding="utf-8", newline="") as f:
        return [CORPUS / row["file"] for row in csv.DictReader(f, delimiter="\t")]
