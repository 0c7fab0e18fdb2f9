"""Start-up cost: import structlog without the rich tracebacks it never gives us.

structlog imports rich (about 40 ms) when it is installed, only to offer rich
tracebacks. mailpipe never lets a renderer format exceptions (``logs.configure`` turns
them into text first, so that redaction sees them), so that import is pure start-up
cost for every ``mailpipe run``. Imported first by ``mailpipe/__init__``; does nothing
when structlog or rich is already loaded (rich, once imported, works as usual).
"""

from __future__ import annotations

import sys


def import_structlog_without_rich() -> None:
    """Import structlog with ``import rich`` failing for the duration."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # import rich -> ImportError
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


import_structlog_without_rich()
