"""Progress bars per mailbox and the end-of-run summary table (rich)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from mailpipe.engine import Summary
from mailpipe.secrets import redact

COLUMNS = (
    "listed",
    "retrieved",
    "processed",
    "dropped",
    "kept",
    "failed",
    "quarantined",
    "deleted",
    "bytes",
    "seconds",
)


class ProgressView:
    """A progress bar per mailbox (when enabled) and a summary table."""

    def __init__(self, *, enabled: bool, console: Console | None = None) -> None:
        self.console = console or Console(file=sys.stderr)
        self.enabled = enabled
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> ProgressView:
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(
        self,
        t: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, mailbox: str, done: int, total: int) -> None:
        """Advance the bar of ``mailbox``."""
        if self._progress is None:
            return
        task = self._tasks.get(mailbox)
        if task is None:
            task = self._tasks[mailbox] = self._progress.add_task(mailbox, total=total)
        self._progress.update(task, completed=done, total=max(total, done))

    def table(self, summaries: list[Summary], console: Any = None) -> None:
        """Print one row per poll summary, plus the error of failed mailboxes."""
        out = console or Console(file=sys.stdout, width=160)
        table = Table("mailbox", *COLUMNS, "status", title="mailpipe run summary")
        for s in summaries:
            row = [str(getattr(s, c)) for c in COLUMNS]
            table.add_row(
                s.mailbox, *row, "ok" if not s.error else f"FAILED: {redact(s.error)}"
            )
        out.print(table)
