"""Progress bars per mailbox and the end-of-run summary table (rich).

The bars are drawn on the console log lines use on a terminal (mailpipe.logs), so a
line logged during a run appears above the bars; while they are on screen, the
per-session info chatter is quiet (:func:`mailpipe.logs.set_live`).

rich is imported only when a bar or the table is drawn: a daemon or a piped
``run --once`` does not pay for it at start-up.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mailpipe.logs import set_live
from mailpipe.secrets import redact

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from mailpipe.engine import Summary

TITLE = "mailpipe run summary"
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
        self._console = console
        self.enabled = enabled
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    @property
    def console(self) -> Console:
        """The console bars are drawn on: unless one was given, the terminal console
        that log lines share (:func:`mailpipe.logs.terminal`), so rich prints them
        above the bars, never into them."""
        if self._console is None:
            from mailpipe.logs import terminal

            self._console = terminal()
        return self._console

    def __enter__(self) -> ProgressView:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            set_live(True)
        return self

    def __exit__(
        self,
        t: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            set_live(False)

    def update(self, mailbox: str, done: int, total: int) -> None:
        """Advance the bar of ``mailbox``."""
        if self._progress is None:
            return
        task = self._tasks.get(mailbox)
        if task is None:
            task = self._tasks[mailbox] = self._progress.add_task(mailbox, total=total)
        self._progress.update(task, completed=done, total=max(total, done))

    def table(self, summaries: list[Summary], console: Any = None) -> None:
        """Print one row per poll summary, plus the error of failed mailboxes.

        A rich table on a terminal (or on ``console``); plain aligned text otherwise,
        so a piped or scheduled run does not import rich just to print it.
        """
        head = ["mailbox", *COLUMNS, "status"]
        rows = [
            [
                s.mailbox,
                *(str(getattr(s, c)) for c in COLUMNS),
                "ok" if not s.error else f"FAILED: {redact(s.error)}",
            ]
            for s in summaries
        ]
        if console is None and not sys.stdout.isatty():
            widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
            lines = [TITLE] + [
                "  ".join(
                    cell.ljust(w) for cell, w in zip(r, widths, strict=True)
                ).rstrip()
                for r in [head, *rows]
            ]
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            return
        from rich.console import Console
        from rich.table import Table

        out = console or Console(file=sys.stdout, width=160)
        table = Table(*head, title=TITLE)
        for row in rows:
            table.add_row(*row)
        out.print(table)
