"""A start/stop base class: every test server is also a context manager."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """Something with ``start()`` and ``stop()``; ``with`` starts it and always stops it."""

    def start(self) -> None:
        """Start serving; return when ready."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop serving; safe to call twice."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
