"""The end-of-run summary table, and what `mailpipe run` imports at start-up."""

from __future__ import annotations

import io
import subprocess
import sys

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


def test_run_start_up_does_not_import_rich() -> None:
    """rich costs ~40-100 ms; a piped `mailpipe run` must not pay for it (structlog
    would import it for tracebacks mailpipe never renders: mailpipe/_imports.py)."""
    code = (
        "import sys, mailpipe.cli, mailpipe.app, mailpipe.scheduler, mailpipe.progress, "
        "mailpipe.logs; mailpipe.logs.configure('json');"
        "import structlog; structlog.get_logger().info('x');"
        "print(sorted(m for m in sys.modules if m == 'rich' or m.startswith('rich.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
