"""Built-in plugin `loopguard`: no automatic answer to auto-replies, bounces, lists,
or a sender past a per-sender budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailpipe import hookimpl
from mailpipe.registry import lazy_exports

if TYPE_CHECKING:
    from .guard import ReplyBudget
    from .processor import LoopGuardOptions, LoopGuardProcessor, refusal

_LAZY = {
    "ReplyBudget": "guard",
    "LoopGuardOptions": "processor",
    "LoopGuardProcessor": "processor",
    "refusal": "processor",
}

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = ["LoopGuardOptions", "LoopGuardProcessor", "ReplyBudget", "refusal"]


@hookimpl
def mailpipe_register_processors(register: Any) -> None:
    """Register the `loopguard` processor."""
    register.lazy("loopguard", f"{__name__}.processor:LoopGuardProcessor")
