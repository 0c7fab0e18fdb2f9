"""The end-of-run summary table."""

from __future__ import annotations

import io

import pytest

from mailpipe.engine import Summary
from mailpipe.progress import COLUMNS, TITLE, ProgressView


def _summaries() -> list[Summary]:
    ok = Summary(mailbox="support", listed=3, retrieved=3, processed=3, deleted=3,
                 bytes=1234, seconds=0.5)
    bad = Summary(mailbox="billing", error="AUTH failed for user@example.com")
    return [ok, bad]


def test_plain_table_when_stdout_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ProgressView(enabled=False).table(_summaries())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == TITLE
    assert lines[1].split() == ["mailbox", *COLUMNS, "status"]
    assert lines[2].split() == ["support", "3", "3", "3", "0", "0", "0", "0", "3",
                                "1234", "0.5", "ok"]
    assert lines[3].startswith("billing") and "FAILED: AUTH failed" in lines[3]
    # columns line up: every cell of a column starts at the same offset
    assert lines[2].index(" 1234 ") == lines[1].index(" bytes ")


def test_rich_table_on_a_console() -> None:
    buf = io.StringIO()
    from rich.console import Console

    ProgressView(enabled=False).table(_summaries(), console=Console(file=buf, width=200))
    out = buf.getvalue()
    assert TITLE in out and "support" in out and "1234" in out and "FAILED" in out

