"""Secrets from the environment, a file or a command; never printed anywhere.

In TOML a secret is ``{ env = "NAME" }``, ``{ file = "path" }`` or
``{ command = ["prog", "arg"] }`` (an OAuth token helper, for example). A plain string is
accepted too. Every resolved value is added to a process-wide set that the log
redaction step masks (see :mod:`mailpipe.logs`).

Redaction masks a secret wherever it stands as a token of its own: not run together
with a letter or digit on either side (an escape such as ``\\n`` or ``\\x00`` in a
repr counts as a separator). So a password that is a common word ("mail") leaves
"mailbox" alone, and a password of any length, even one character, is masked.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

_KNOWN: set[str] = set()
_LOCK = threading.Lock()
_PATTERN: re.Pattern[str] | None = None  # every known secret as a token; None: none
MASK = "**********"
#: Seconds a ``command`` secret may run before it is killed and reported as failed.
COMMAND_TIMEOUT = 60.0

# A secret's edge that is a word character must not touch another word character,
# unless that one ends a backslash escape (repr, JSON): "\\nhunter2" holds "hunter2".
_BEFORE = (
    r"(?:(?<!\w)|(?<=\\[abfnrtv0])|(?<=\\x[0-9A-Fa-f]{2})"
    r"|(?<=\\u[0-9A-Fa-f]{4})|(?<=\\U[0-9A-Fa-f]{8})|(?<=%[0-9A-Fa-f]{2}))"
)
_AFTER = r"(?!\w)"  # an escape that follows starts with a backslash: not \w


def known_secret_values() -> frozenset[str]:
    """Return every secret value resolved in this process (for redaction)."""
    with _LOCK:
        return frozenset(_KNOWN)


def forget_secrets() -> None:
    """Empty the redaction set (for test isolation; never needed in production)."""
    global _PATTERN
    with _LOCK:
        _KNOWN.clear()
        _PATTERN = None


def forget_secret(value: str) -> None:
    """Remove ``value`` from the redaction set (a replaced OAuth token).

    Values that rotate (access and refresh tokens) are forgotten when their successor
    is remembered: the set, and the pattern compiled from it, stay the size of what is
    current instead of growing with every refresh for the life of the process.
    """
    global _PATTERN
    with _LOCK:
        if value in _KNOWN:
            _KNOWN.discard(value)
            _PATTERN = None


def _token(value: str) -> str:
    """``value`` as a regex that matches it only where it stands as a token."""
    head = _BEFORE if re.match(r"\w", value) else ""
    tail = _AFTER if re.search(r"\w$", value) else ""
    return f"{head}{re.escape(value)}{tail}"


def _remember(values: set[str]) -> None:
    global _PATTERN
    with _LOCK:
        new = {v for v in values if v} - _KNOWN
        if not new:
            return
        _KNOWN.update(new)
        # Compiled at the next redact(), not here: a config with a thousand mailboxes
        # remembers a thousand passwords, and compiling the growing pattern after each
        # one cost quadratic time at start-up (minutes with 200 mailboxes on a busy host).
        _PATTERN = None


def _pattern() -> re.Pattern[str] | None:
    """Every known secret as one pattern, compiled once per change of the set."""
    global _PATTERN
    with _LOCK:
        if _PATTERN is None and _KNOWN:
            # Longest first: a secret that contains another is masked whole.
            ordered = sorted(_KNOWN, key=len, reverse=True)
            _PATTERN = re.compile("|".join(_token(v) for v in ordered))
        return _PATTERN


# scheme://user:PASSWORD@host — the password of a URL's userinfo (RFC 3986 §3.2.1),
# up to the last "@" before the path: a raw "@" in a password (not percent-encoded, as
# users write them) is part of it, never the end of it.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:@/]*:)([^\s/]+)@")


def remember_secret(value: str) -> None:
    """Add ``value`` to the redaction set (any length; the empty string is ignored).

    The password inside a URL value (``postgresql://u:PW@h/db``) is added on its own
    too, raw and percent-decoded, since error messages quote it without the URL.
    """
    parts = {value}
    for match in _URL_PASSWORD.finditer(value):
        parts |= {match.group(2), urllib.parse.unquote(match.group(2))}
    _remember(parts)


_SECRET_NAMES = re.compile(
    r"password|passwd|secret|token|passphrase|dsn|api[_-]?key|authorization|cookie"
    r"|credential",
    re.I,
)
_CREDENTIAL = re.compile(
    r"^\s*(bearer|basic|digest|token|apikey)\s+[A-Za-z0-9._~+/=:-]{8,}\s*$", re.I
)


def is_secret_name(name: str) -> bool:
    """True when a key or header called ``name`` holds a credential (``password``,
    ``X-Api-Key``, ``Authorization``, ``Cookie``...)."""
    return _SECRET_NAMES.search(name) is not None


def is_credential(value: str) -> bool:
    """True when ``value`` reads as an HTTP credential (``Bearer <token>``...)."""
    return _CREDENTIAL.match(value) is not None


def remember_url_password(url: str) -> None:
    """Add only the password of ``url`` (if any) to the redaction set."""
    for match in _URL_PASSWORD.finditer(url):
        remember_secret(match.group(2))
        remember_secret(urllib.parse.unquote(match.group(2)))


def mask_url_passwords(text: str) -> str:
    """Replace the password of every ``scheme://user:password@`` in ``text`` by a mask."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}@", text)


def redact(text: str) -> str:
    """Replace every URL's password, and every known secret value where it stands as a
    token of its own (see the module docstring), inside ``text``."""
    text = mask_url_passwords(text)
    pattern = _pattern()
    return text if pattern is None else pattern.sub(MASK, text)


class Secret:
    """A secret value with its origin; ``repr``/``str`` never show the value.

    ``get()`` returns the value; for ``command`` secrets ``refresh()`` runs the command
    again (OAuth tokens expire), and ``refresh_async()`` does so from async code without
    blocking the event loop. Construction resolves immediately, so a missing variable
    or file is a config error, not a runtime surprise.
    """

    __slots__ = ("_value", "origin", "spec")

    def __init__(self, spec: Any, *, base_dir: Path | None = None) -> None:
        self.spec = spec
        self._value = ""
        if isinstance(spec, str):
            self.origin = "inline"
            self._value = spec
        elif isinstance(spec, dict) and len(spec) == 1:
            ((kind, arg),) = spec.items()
            self.origin = str(kind)
            self._value = _resolve(str(kind), arg, base_dir)
        else:
            raise ValueError(
                "a secret is a string or a table with exactly one of "
                "'env', 'file' or 'command'"
            )
        remember_secret(self._value)

    def get(self) -> str:
        """Return the secret value."""
        return self._value

    def refresh(self) -> str:
        """Re-resolve ``command`` secrets (fresh OAuth token); return the value."""
        if self.origin == "command":
            self._value = _resolve("command", self.spec["command"], None)
            remember_secret(self._value)
        return self._value

    async def refresh_async(self, *, timeout: float = COMMAND_TIMEOUT) -> str:
        """:meth:`refresh` for the event loop: the command runs as an asyncio
        subprocess (other mailboxes go on meanwhile) and is killed after ``timeout``
        seconds. Failures raise ValueError naming the program, never its output;
        the previous value is kept then."""
        if self.origin == "command":
            self._value = await _run_command_async(self.spec["command"], timeout)
            remember_secret(self._value)
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.origin}, {MASK})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def validate(value: Any, info: core_schema.ValidationInfo) -> Secret:
            if isinstance(value, Secret):
                return value
            ctx = info.context if isinstance(info.context, dict) else {}
            base = ctx.get("base_dir")
            return Secret(value, base_dir=Path(base) if base else None)

        return core_schema.with_info_plain_validator_function(
            validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda s: {"origin": s.origin}
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "description": "A secret: a string, {env = NAME}, {file = PATH} "
            "or {command = [PROGRAM, ARG...]}",
            "anyOf": [
                {"type": "string"},
                {
                    "type": "object",
                    "properties": {"env": {"type": "string"}},
                    "required": ["env"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"file": {"type": "string"}},
                    "required": ["file"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {
                        "command": {
                            "anyOf": [
                                {"type": "string"},
                                {"type": "array", "items": {"type": "string"}},
                            ]
                        }
                    },
                    "required": ["command"],
                    "additionalProperties": False,
                },
            ],
        }


def _resolve(kind: str, arg: Any, base_dir: Path | None) -> str:
    if kind == "env":
        if not isinstance(arg, str) or not arg:
            raise ValueError("'env' takes the name of an environment variable")
        if arg not in os.environ:
            raise ValueError(f"environment variable {arg} is not set")
        return os.environ[arg]
    if kind == "file":
        path = Path(str(arg)).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            return path.read_text().strip("\r\n")
        except OSError as exc:
            raise ValueError(
                f"cannot read secret file {path}: {exc.strerror}"
            ) from None
    if kind == "command":
        argv = _argv(arg)
        try:
            done = subprocess.run(
                argv, capture_output=True, timeout=COMMAND_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ValueError(
                f"secret command {argv[0]!r} failed: {type(exc).__name__}"
            ) from None
        return _output(argv, done.returncode, done.stdout)
    raise ValueError(f"unknown secret source {kind!r}; accepted: env, file, command")


def _argv(arg: Any) -> list[str]:
    argv = [arg] if isinstance(arg, str) else arg
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("'command' takes a program and its arguments as a list of strings")
    return argv


def _output(argv: list[str], returncode: int | None, stdout: bytes) -> str:
    """The value a command printed; ValueError (without its output) when it failed."""
    if returncode != 0:
        raise ValueError(f"secret command {argv[0]!r} exited {returncode}")
    return stdout.decode("utf-8", "replace").strip("\r\n")


async def _run_command_async(arg: Any, timeout: float) -> str:
    """Run a ``command`` secret without blocking the loop; kill it after ``timeout``."""
    argv = _argv(arg)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise ValueError(
            f"secret command {argv[0]!r} failed: {type(exc).__name__}"
        ) from None
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ValueError(
            f"secret command {argv[0]!r} failed: timed out after {timeout:g} s"
        ) from None
    except BaseException:  # cancelled (shutdown): leave no helper behind
        if proc.returncode is None:
            proc.kill()
        raise
    return _output(argv, proc.returncode, stdout)
