"""Fixtures of the end-to-end suites: the shared corpus for the interop suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _corpus_dir() -> Path:
    env = os.environ.get("MAILPIPE_CORPUS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> list[tuple[str, bytes]]:
    """Every ``../shared/corpus/*.eml`` as (file name, bytes), sorted by name.

    Skips when the corpus is absent; fails instead when env ``CI`` is set.
    """
    directory = _corpus_dir()
    if not (directory / "MANIFEST.tsv").is_file():
        reason = f"corpus not found at {directory} (set MAILPIPE_CORPUS)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI provides ../shared/corpus", pytrace=False)
        pytest.skip(reason)
    return [(p.name, p.read_bytes()) for p in sorted(directory.glob("*.eml"))]
