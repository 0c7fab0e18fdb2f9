"""forward.command: pipe the raw message to a program, MDA style (sysexits.h codes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import ClassVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from mailpipe.errors import PermanentFailure, TemporaryFailure
from mailpipe.message import Message
from mailpipe.processor import ProcessorContext
from mailpipe.secrets import redact
from mailpipe.units import Duration

log = structlog.get_logger()

EX_TEMPFAIL = 75
"""sysexits.h: temporary failure; the MDA asks to be tried again later."""
STDERR_LIMIT = 2048
"""Octets of the program's stderr kept for the error message (the rest is drained)."""
_CHUNK = 1 << 16


class CommandForwardOptions(BaseModel):
    """Options of ``forward.command``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    command: list[str] = Field(
        min_length=1,
        description="Program and arguments, run without a shell; the raw message is "
        "its standard input.",
    )
    timeout: Duration = Field(
        default=60.0, gt=0, description="Kill the program after this long (retried later)."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables."
    )
    inherit_env: bool = Field(
        strict=True,
        default=True, description="Start from mailpipe's environment (else PATH only)."
    )
    cwd: Path | None = Field(
        default=None, description="Working directory; relative to the config file."
    )
    tempfail_codes: list[StrictInt] = Field(
        default_factory=lambda: [EX_TEMPFAIL],
        description="Exit codes meaning 'retry later' (default 75, EX_TEMPFAIL).",
    )

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("the program name is empty")
        if any("\0" in part for part in value):
            raise ValueError("arguments cannot contain NUL")
        return value


class CommandForwardProcessor:
    """Run ``command`` once per message with the raw bytes on stdin.

    Exit 0 commits; a code in ``tempfail_codes`` (75) or a timeout raises
    TemporaryFailure; any other code raises PermanentFailure with the first bytes of
    stderr. The environment carries MAILPIPE_KEY, MAILPIPE_UID and MAILPIPE_MAILBOX so
    the program can deduplicate a re-run after a crash.
    """

    name: ClassVar[str] = "forward.command"
    Options: ClassVar[type[BaseModel]] = CommandForwardOptions
    commits: ClassVar[bool] = True

    def __init__(self, options: CommandForwardOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context
        self._cwd = context.resolve(options.cwd) if options.cwd else None

    def environment(self, message: Message) -> dict[str, str]:
        """The program's environment for ``message``."""
        o = self.options
        env = dict(os.environ) if o.inherit_env else {"PATH": os.defpath}
        env.update(o.env)
        env["MAILPIPE_KEY"] = message.key
        env["MAILPIPE_UID"] = message.ref.uid
        env["MAILPIPE_MAILBOX"] = message.ref.mailbox
        return env

    async def process(self, message: Message) -> None:
        """Pipe one message; return once the program exited 0."""
        o = self.options
        program = o.command[0]
        bound = log.bind(processor=self.name, key=message.key, uid=message.ref.uid)
        if self.context.dry_run:
            bound.info("forward_skipped", reason="dry_run", program=program)
            return
        try:
            proc = await asyncio.create_subprocess_exec(
                *o.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=self.environment(message),
                cwd=self._cwd,
                start_new_session=True,  # own process group: a timeout kills it all
            )
        except OSError as exc:
            # A missing or non-executable program is a configuration problem.
            error = PermanentFailure(f"cannot run {program!r}: {exc.strerror or exc}")
            bound.warning("forward_failed", error=str(error))
            raise error from None
        assert proc.stdin is not None and proc.stderr is not None
        stderr = bytearray()
        try:
            async with asyncio.timeout(o.timeout):
                await asyncio.gather(
                    _feed(proc.stdin, message), _drain(proc.stderr, stderr)
                )
                code = await proc.wait()
        except TimeoutError:
            _kill(proc)
            await proc.wait()
            deferred = TemporaryFailure(
                f"{program!r} did not finish within {o.timeout:g}s and was killed"
            )
            bound.warning("forward_deferred", error=str(deferred))
            raise deferred from None
        except BaseException:
            _kill(proc)
            with contextlib.suppress(ProcessLookupError):
                await asyncio.shield(proc.wait())
            raise
        if code == 0:
            bound.info("forward_sent", program=program, size=message.size)
            return
        detail = redact(bytes(stderr).decode("utf-8", "replace")).strip()
        text = f"{program!r} exited {_describe_code(code)}" + (
            f": {detail}" if detail else ""
        )
        if code in o.tempfail_codes:
            bound.warning("forward_deferred", error=text)
            raise TemporaryFailure(text)
        bound.warning("forward_failed", error=text)
        raise PermanentFailure(text)


async def _feed(stdin: asyncio.StreamWriter, message: Message) -> None:
    """Stream the raw message to the program; a program that stops reading is no error."""
    try:
        with message.open() as f:
            while chunk := f.read(_CHUNK):
                stdin.write(chunk)
                await stdin.drain()
        stdin.close()
        await stdin.wait_closed()
    except (BrokenPipeError, ConnectionResetError):
        pass  # it exited early; its exit code decides


async def _drain(stream: asyncio.StreamReader, keep: bytearray) -> None:
    """Read stderr to EOF, keeping the first STDERR_LIMIT octets."""
    while chunk := await stream.read(_CHUNK):
        room = STDERR_LIMIT - len(keep)
        if room > 0:
            keep.extend(chunk[:room])


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _describe_code(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"on signal {signal.Signals(-code).name}"
    return str(code)


PROCESSORS = [CommandForwardProcessor]
