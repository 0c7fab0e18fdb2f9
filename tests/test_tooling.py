"""Lint and type checks as tests: `ruff check .` and `mypy` (files from pyproject) pass."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    # The same interpreter as the tests, so the tools are those `.[test]` installed.
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )


def test_ruff_and_mypy_are_configured_in_pyproject() -> None:
    tool = PYPROJECT["tool"]
    assert tool["ruff"]["target-version"] == "py311"
    assert tool["ruff"]["lint"]["select"]
    assert tool["mypy"]["strict"] is True
    assert tool["mypy"]["files"] == ["mailpipe"]


@pytest.mark.timeout(600)
def test_ruff_check_is_clean_everywhere() -> None:
    done = run_tool("ruff", "check", ".", "--output-format", "concise", "--no-cache")
    assert done.returncode == 0, f"ruff check . found problems:\n{done.stdout}{done.stderr}"


@pytest.mark.timeout(600)
def test_mypy_strict_is_clean_on_mailpipe() -> None:
    done = run_tool("mypy")
    assert done.returncode == 0, f"mypy found problems:\n{done.stdout}{done.stderr}"
    assert "Success: no issues found" in done.stdout
