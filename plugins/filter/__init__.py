"""Built-in plugin `filter`: declarative rules (see docs/filter.md and rules.py)."""

from __future__ import annotations

from typing import Any

from mailpipe import hookimpl

from .conditions import Condition, Facts
from .processor import FilterOptions, FilterProcessor
from .rules import Rule

__all__ = ["Condition", "Facts", "FilterOptions", "FilterProcessor", "Rule"]


@hookimpl
def mailpipe_register_processors(register: Any) -> None:
    """Register the `filter` processor."""
    register(FilterProcessor)
