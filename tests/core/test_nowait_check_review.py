"""Review of h-lows item 1: an ``async def process_nowait`` is a mistake in the
processor's class, so ``mailpipe check`` (which validates the config without building
the chain) refuses it too, not only ``mailpipe run`` when it builds the chain."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from mailpipe.app import load_config
from mailpipe.errors import PluginError
from mailpipe.message import Message
from mailpipe.registry import Registry
from mailpipe.testing.fakes import FakeSource


class NoOptions(BaseModel):
    """AsyncNowait takes none."""


class AsyncNowait:
    name: ClassVar[str] = "asyncnowait"
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel, context: Any) -> None:
        pass

    def process(self, message: Message) -> None:
        return None

    async def process_nowait(self, message: Message) -> None:
        return None


def test_check_refuses_an_async_process_nowait(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[[mailboxes]]\nname = "m"\nsource = "fake"\n\n'
        '[pipelines.default]\nprocessors = [{ use = "asyncnowait" }]\n'
    )
    with pytest.raises(PluginError, match=r"asyncnowait.*process_nowait.*synchronous"):
        registry = Registry()
        registry.add("source", FakeSource, "test")
        registry.add("processor", AsyncNowait, "test")
        load_config(path, registry=registry)  # what `mailpipe check` runs
