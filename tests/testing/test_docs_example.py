"""The example test in docs/testing.md runs, as a plugin author would run it, and passes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"


def example_source() -> str:
    text = DOC.read_text()
    match = re.search(
        r'```python title="test_my_pipeline.py"\n(.*?)```', text, re.DOTALL
    )
    assert match is not None, "docs/testing.md lost its example test"
    return match.group(1)


def test_docs_example_passes(tmp_path: Path) -> None:
    (tmp_path / "test_my_pipeline.py").write_text(example_source())
    (tmp_path / "conftest.py").write_text(
        'pytest_plugins = ["mailpipe.testing.pytest_plugin"]\n'
    )
    # Like any project with pytest-asyncio installed: newer pytest turns its "loop
    # scope unset" deprecation warning into an error under -W error.
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "2 passed" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 0
