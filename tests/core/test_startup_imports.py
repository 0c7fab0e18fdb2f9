"""What `mailpipe run` imports at start-up: only what its configuration uses.

Each check runs in a fresh interpreter (this test process has imported everything).
"""

from __future__ import annotations

import subprocess
import sys


def modules_after(code: str, prefix: str) -> list[str]:
    """Run ``code`` in a new interpreter; the loaded modules starting with ``prefix``."""
    probe = (
        f"{code}\nimport sys\n"
        f"print('\\n'.join(sorted(m for m in sys.modules if m.startswith({prefix!r}))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_run_start_up_does_not_import_rich() -> None:
    """rich costs ~40-100 ms; a piped `mailpipe run` must not pay for it (structlog
    would import it for tracebacks mailpipe never renders: mailpipe/_imports.py)."""
    code = (
        "import mailpipe.cli, mailpipe.app, mailpipe.scheduler, mailpipe.progress\n"
        "import mailpipe.logs; mailpipe.logs.configure('json')\n"
        "import structlog; structlog.get_logger().info('x')"
    )
    assert [m for m in modules_after(code, "rich") if m.split(".")[0] == "rich"] == []


def test_loading_the_plugins_imports_no_processor_module() -> None:
    """A configuration that uses store.maildir must not pay for parse, filter, the
    forwarders (aiosmtplib, httpx, broker clients) or the other stores."""
    loaded = modules_after(
        "from mailpipe.plugin_manager import load; load()", "mailpipe.plugins."
    )
    processors = [
        m for m in loaded if m.count(".") == 3 and not m.startswith("mailpipe.plugins.pop3")
    ]
    assert processors == []
