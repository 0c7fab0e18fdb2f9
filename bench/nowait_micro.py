"""CPU per message of ``Chain.run`` over one step that ``process_nowait`` handles.

The step's ``process_nowait`` returns None at once, so what is measured is the
chain's own cost of an on-the-loop call (bench/RESULTS.md, h-lows). Run it from a
directory outside the tree with each interpreter to compare, interleaved:
``python bench/nowait_micro.py [messages]``.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import mailpipe
from mailpipe.chain import Chain
from mailpipe.config import StepSpec
from mailpipe.message import Message


class NoOptions(BaseModel):
    """Quick takes none."""


class Quick:
    """Handles every message on the loop, doing nothing."""

    commits, idempotent = True, True

    def __init__(self, options: BaseModel, context: Any) -> None:
        pass

    def process_nowait(self, message: Message) -> None:
        return None

    def process(self, message: Message) -> None:
        return None


async def per_message(n: int) -> float:
    """Microseconds of CPU a message over ``n`` messages (after 2,000 warm-up)."""
    spec = StepSpec(index=0, step="1:quick", use="quick", cls=Quick, options=NoOptions())
    with tempfile.TemporaryDirectory() as tmp:
        chain = Chain({"p": [spec]}, base_dir=Path(tmp))
        msg = Message.from_bytes(b"Subject: x\r\n\r\nbody\r\n", uid="u")
        for _ in range(2000):
            await chain.run("p", msg)
        began = time.process_time()
        for _ in range(n):
            await chain.run("p", msg)
        spent = time.process_time() - began
        await chain.close()
    return spent / n * 1e6


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    print(mailpipe.__file__, f"{asyncio.run(per_message(count)):.2f} us/msg")
