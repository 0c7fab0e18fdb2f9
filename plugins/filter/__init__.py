"""Built-in plugin `filter`: declarative rules (see docs/filter.md and rules.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailpipe import hookimpl
from mailpipe.registry import lazy_exports

if TYPE_CHECKING:
    from mailpipe.registry import Register

    from .conditions import Condition, Facts
    from .processor import FilterOptions, FilterProcessor
    from .rules import Rule

#: Public names and their modules: imported on first use (PEP 562), so that loading
#: the plugin costs nothing until a configuration uses `filter`.
_LAZY = {
    "Condition": "conditions",
    "Facts": "conditions",
    "FilterOptions": "processor",
    "FilterProcessor": "processor",
    "Rule": "rules",
}

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = ["Condition", "Facts", "FilterOptions", "FilterProcessor", "Rule"]


@hookimpl
def mailpipe_register_processors(register: Register) -> None:
    """Register the `filter` processor."""
    register.lazy("filter", f"{__name__}.processor:FilterProcessor")
