"""The engine's size guard holds whatever a source does with ``max_size``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailpipe import oversize
from mailpipe.errors import OversizeError
from mailpipe.message import Message, MessageRef

BIG = b"Subject: big\r\n\r\n" + b"x" * 5000 + b"\r\n"


class Ignores:
    """Accepts max_size (as a source written from the guide might) and ignores it."""

    async def retrieve(self, refs: Any, *, spool_dir: Path, spool_threshold: int,
                       max_size: int | None = None) -> Any:
        for ref in refs:
            yield Message(ref=ref, data=BIG)


class Predates:
    """Written before max_size existed."""

    async def retrieve(self, refs: Any, *, spool_dir: Path, spool_threshold: int) -> Any:
        for ref in refs:
            yield Message(ref=ref, data=BIG)


@pytest.mark.parametrize("session", [Ignores(), Predates()], ids=["ignores", "predates"])
async def test_a_message_past_max_size_never_reaches_the_chain(
    session: Any, tmp_path: Path
) -> None:
    ref = MessageRef(mailbox="m", number=1, uid="u", size=10)  # listed small, sent big
    got: list[Any] = []
    with pytest.raises(OversizeError, match="more than 1000"):
        async for item in oversize.retrieve(session, [ref], spool_dir=tmp_path,
                                            spool_threshold=1 << 20, max_size=1000):
            got.append(item)
    assert got == []
