"""A slow OAuth token helper does not stall the other mailboxes (issue 20 item 5).

Mailbox ``a`` logs in with XOAUTH2 and a ``{command = [...]}`` token whose helper
waits until mailbox ``b``'s message has been stored; ``b``'s chain first waits until
that helper is running. Both finish only if the helper ran off the event loop. The
waits are safety nets (a regression fails instead of hanging), not thresholds.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from mailpipe.plugins.pop3.source import Pop3Source
from pydantic import BaseModel, ConfigDict

from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.message import Message
from mailpipe.plugin_manager import Hooks, get_plugin_manager
from mailpipe.registry import Registry
from mailpipe.scheduler import Scheduler
from mailpipe.testing import Pop3Server
from mailpipe.validation import validate_config

pytestmark = pytest.mark.timeout(60)

SAFETY = 10.0

# First run (config validation): print a token at once. Later runs: say "started",
# wait for the stored marker, and print the good token only if it came.
HELPER = """
import pathlib, sys, time
state, started, stored = map(pathlib.Path, sys.argv[1:4])
if not state.exists():
    state.touch()
    print("tok-initial")
    sys.exit()
started.touch()
for _ in range(int(float(sys.argv[4]) * 100)):
    if stored.exists():
        break
    time.sleep(0.01)
print("tok-ok" if stored.exists() else "tok-late")
"""


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Paths:
    started: ClassVar[Path]
    stored: ClassVar[Path]


class AfterHelper:
    """Waits until the token helper runs (orders the two mailboxes)."""

    name: ClassVar[str] = "afterhelper"
    Options: ClassVar[type[BaseModel]] = Opts
    saw_helper: ClassVar[bool | None] = None

    def __init__(self, options: Opts, context: Any) -> None:
        pass

    def process(self, message: Message) -> None:
        for _ in range(int(SAFETY * 100)):
            if Paths.started.exists():
                AfterHelper.saw_helper = True
                return
            time.sleep(0.01)
        AfterHelper.saw_helper = False


class Mark:
    """A store: records the mailbox and creates the marker the helper waits for."""

    name: ClassVar[str] = "mark"
    Options: ClassVar[type[BaseModel]] = Opts
    commits: ClassVar[bool] = True
    stored: ClassVar[list[str]] = []

    def __init__(self, options: Opts, context: Any) -> None:
        pass

    def process(self, message: Message) -> None:
        Mark.stored.append(message.ref.mailbox)
        Paths.stored.touch()


MSG = b"From: a@example.com\r\nSubject: hello\r\n\r\nbody\r\n"


async def test_slow_token_command_does_not_stall_another_mailbox(
    tmp_path: Path,
) -> None:
    Paths.started = tmp_path / "helper-started"
    Paths.stored = tmp_path / "b-stored"
    AfterHelper.saw_helper = None
    Mark.stored = []
    registry = Registry()
    registry.add("source", Pop3Source, "test")
    for cls in (AfterHelper, Mark):
        registry.add("processor", cls, "test")
    async with (
        Pop3Server([MSG], mechanisms=("XOAUTH2",), oauth_tokens={"user": "tok-ok"})
        as srv_a,
        Pop3Server([MSG]) as srv_b,
    ):
        common = {"host": srv_a.host, "security": "none", "username": "user",
                  "allow_plaintext_password": True, "read_timeout": 30}
        helper = [sys.executable, "-c", HELPER, str(tmp_path / "state"),
                  str(Paths.started), str(Paths.stored), str(SAFETY)]
        data = {
            "mailboxes": [
                {"name": "a", "pipeline": "a", "port": srv_a.port, "auth": "xoauth2",
                 "oauth_token": {"command": helper}, **common},
                {"name": "b", "pipeline": "b", "port": srv_b.port, "password": "pass",
                 **common},
            ],
            "pipelines": {
                "a": {"processors": [{"use": "mark"}]},
                "b": {"processors": [{"use": "afterhelper"}, {"use": "mark"}]},
            },
        }
        config = validate_config(data, path=tmp_path / "p.toml", registry=registry)
        scheduler = Scheduler(
            config,
            journal=SqliteJournal(tmp_path / "j.sqlite3"),
            hooks=Hooks(get_plugin_manager(entry_points=False)),
            once=True,
        )
        summaries = await asyncio.wait_for(scheduler.run(), 4 * SAFETY)
    assert AfterHelper.saw_helper is True  # the helper was running first...
    assert sorted(Mark.stored) == ["a", "b"]  # ...and got its token after b stored
    assert all(s.error is None for s in summaries), summaries
