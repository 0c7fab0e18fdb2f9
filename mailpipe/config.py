"""What ``pipeline.toml`` holds: its tables as pydantic models, and the validated result.

:func:`read_toml` reads the file; the models check the core structure (phase 1 of
:mod:`mailpipe.validation`, ``extra="forbid"``: typos are errors); :class:`Config` is
what validation returns, each mailbox and chain step bound to its plugin class and
options. :func:`mailpipe.app.open_app` is the one loader that joins them.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from mailpipe.errors import ConfigError, Problem
from mailpipe.registry import Registry
from mailpipe.secrets import Secret, remember_secret, remember_url_password
from mailpipe.source import Ack, AckKind
from mailpipe.units import ByteSize, Duration

_DELETE_RE = re.compile(r"^after_days:(\d+(?:\.\d+)?)$")
# libpq's key=value connection string (host=h user=u password=pw dbname=d).
_LIBPQ_PAIR = re.compile(r"\s*([a-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|\S*)")
_LIBPQ_KEYS = frozenset(
    {
        "host", "hostaddr", "port", "dbname", "user", "password", "passfile",
        "sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "options",
        "application_name", "service", "target_session_attrs", "channel_binding",
    }
)


def _check_delete(value: Any) -> Any:
    if isinstance(value, str) and (
        value in ("after_processing", "never") or _DELETE_RE.match(value)
    ):
        return value
    raise ValueError("expected 'after_processing', 'never' or 'after_days:N'")


DeletePolicy = Annotated[str, BeforeValidator(_check_delete)]

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_NAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")




class StateConfig(BaseModel):
    """``[state]``: where the journal lives."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        "var/mailpipe.sqlite3",
        description="SQLite journal file (relative to the config file), or a "
        "postgresql:// URL for a journal shared by several workers; a URL holding a "
        'password can be given as a secret: { env = "MAILPIPE_JOURNAL_URL" }.',
        repr=False,
    )

    @field_validator("path", mode="before")
    @classmethod
    def _path_secret(cls, value: Any, info: ValidationInfo) -> Any:
        # A postgresql:// URL may hold a password: resolve secret tables, and register
        # the URL's password for redaction in logs and errors either way.
        if isinstance(value, dict):
            ctx = info.context if isinstance(info.context, dict) else {}
            base = ctx.get("base_dir")
            value = Secret(value, base_dir=Path(base) if base else None).get()
        if isinstance(value, str):
            remember_url_password(value)
            _refuse_libpq_dsn(value)
        return value


def _refuse_libpq_dsn(value: str) -> None:
    """Raise ValueError when ``value`` is a libpq ``key=value`` string, not a path.

    It would otherwise name a SQLite file after the whole string, password included;
    the password is registered for redaction first, so the report masks it.
    """
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(value.rstrip()):
        m = _LIBPQ_PAIR.match(value, pos)
        if m is None or m.end() == pos:
            return  # not key=value pairs: a file name
        pairs.append((m.group(1).lower(), m.group(2)))
        pos = m.end()
    if not any(key in _LIBPQ_KEYS for key, _ in pairs):
        return
    for key, raw in pairs:
        if key == "password":
            remember_secret(raw)
            remember_secret(raw[1:-1] if raw.startswith("'") else raw)
    raise ValueError(
        "a libpq 'key=value' connection string is not accepted; write it as a "
        "URL, postgresql://USER:PASSWORD@HOST:PORT/DBNAME (or a secret table such "
        'as { env = "MAILPIPE_JOURNAL_URL" }), or give a SQLite file path'
    )


class QuarantineConfig(BaseModel):
    """``[quarantine]``: where poison and refused messages go."""

    model_config = ConfigDict(extra="forbid")

    dir: str = Field(
        "var/quarantine",
        description="Directory of quarantined .eml files, each with a .json sidecar.",
    )


class SchedulerConfig(BaseModel):
    """``[scheduler]``: how mailboxes are polled."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(
        64,
        strict=True,
        ge=1,
        le=10000,
        description="Mailboxes polled at the same time, in all.",
    )
    host_concurrency: int = Field(
        32,
        strict=True,
        ge=1,
        le=10000,
        description="Polls of one server (the source's host option, in lower case) "
        "running at the same time in this worker; each poll holds one connection, "
        "its session. Not counted: connections a source keeps between polls (IMAP "
        "push: up to idle_connections IDLE connections and one STATUS connection "
        "per mailbox) and other workers' polls; keep their sum within the "
        "server's per-address connection limit.",
    )
    spool_dir: str = Field(
        "var/spool", description="Where large messages are spooled while processed."
    )
    spool_threshold: ByteSize = Field(
        1_000_000, description="Messages larger than this are spooled to disk."
    )
    lease_ttl: Duration = Field(
        300.0,
        gt=0,
        description="Lifetime of a mailbox lease; renewed during a session.",
    )
    backoff_initial: Duration = Field(
        5.0, gt=0, description="First retry delay after a failed poll."
    )
    backoff_max: Duration = Field(
        900.0, gt=0, description="Cap of the retry delay for temporary failures."
    )
    backoff_auth: Duration = Field(
        3600.0,
        gt=0,
        description="Delay after authentication or SYS/PERM failures (stop hammering).",
    )


class PluginsConfig(BaseModel):
    """``[plugins]``: which plugins load."""

    model_config = ConfigDict(extra="forbid")

    disable: list[str] = Field(
        default_factory=list,
        description="Plugin names not to load (also MAILPIPE_DISABLE_PLUGINS).",
    )


class MetricsConfig(BaseModel):
    """``[metrics]``: an optional Prometheus and health endpoint in ``run`` mode."""

    model_config = ConfigDict(extra="forbid")

    listen: str | None = Field(
        None,
        description="host:port for GET /metrics and /healthz (e.g. '127.0.0.1:9108'); "
        "unset = off.",
        pattern=r"^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$",
    )
    unhealthy_after: Duration = Field(
        900.0,
        gt=0,
        description="/healthz fails when a mailbox has not succeeded for this long.",
    )
    admin_token: Secret | None = Field(
        None,
        description="Token that allows replay and drop on the status page at / "
        '(e.g. { env = "MAILPIPE_ADMIN_TOKEN" }); unset = the page is read-only.',
    )
    hosts: list[str] = Field(
        default_factory=list,
        description="Host names the status page at / also answers to (besides IP "
        "addresses, localhost and the listen host); any other Host gets 421, "
        "against DNS rebinding. /metrics and /healthz answer any Host.",
    )

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if len(name) > 253 or not _HOST_NAME_RE.match(name):
                raise ValueError(
                    f"{name!r} is not a DNS host name without a port "
                    "(e.g. 'status.example.org')"
                )
        return [name.lower() for name in value]


class MoveAck(BaseModel):
    """``acknowledge = { move = "Processed" }``: move the message to that folder."""

    model_config = ConfigDict(extra="forbid")

    move: str = Field(min_length=1, description="The folder processed mail moves to.")


class FlagAck(BaseModel):
    """``acknowledge = { flag = "$Processed" }``: set that flag or keyword."""

    model_config = ConfigDict(extra="forbid")

    flag: str = Field(min_length=1, description="The flag or keyword to set.")


class MailboxConfig(BaseModel):
    """``[[mailboxes]]``: one mailbox; keys not listed here belong to its source."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(
        description="Unique name; used in logs, the journal and message keys.",
        pattern=r"^[A-Za-z0-9_.@+-]{1,128}$",
    )
    source: str = Field("pop3", description="Source plugin (see `mailpipe plugins`).")
    enabled: bool = Field(
        True, strict=True, description="Set false to skip this mailbox."
    )
    pipeline: str = Field("default", description="Name of the [pipelines.NAME] to run.")
    poll_interval: Duration = Field(60.0, gt=0, description="Time between polls.")
    jitter: float = Field(
        0.1, strict=True, ge=0, le=1, description="Random spread of the poll interval (fraction)."
    )
    delete: DeletePolicy = Field(
        "after_processing",
        description="'after_processing' (DELE then QUIT), 'never' (keep on server; "
        "process each UIDL once) or 'after_days:N'.",
    )
    on_uidl_reset: Literal["stop", "ingest"] = Field(
        "stop",
        description="Keep modes only ('never', 'after_days:N'): when most listed uids "
        "are new and most kept ones are gone, reappearing by size among the new ones "
        "(a UIDL reset is suspected), 'stop' fails the poll and processes nothing; "
        "'ingest' logs a warning and processes them.",
    )
    max_message_size: ByteSize | None = Field(
        None,
        description="Messages larger than this are not processed: per LIST before "
        "download, and a transfer passing it is stopped (on_oversize applies).",
    )
    on_oversize: Literal["skip", "quarantine", "delete"] = Field(
        "skip", description="What to do with a message over max_message_size."
    )
    max_messages: int | None = Field(
        None, strict=True, ge=1, description="At most this many messages per session."
    )
    max_bytes: ByteSize | None = Field(
        None, description="At most this many octets retrieved per session."
    )
    commit_window: int = Field(
        500,
        strict=True,
        ge=0,
        description="Apply the acknowledgements every N messages: POP3 QUITs and "
        "reconnects, IMAP expunges and goes on in the same session (0 = all at the end).",
    )
    max_attempts: int = Field(
        3, strict=True, ge=1, description="Failed attempts before a message is quarantined."
    )
    on_quarantine: Literal["delete", "keep"] | MoveAck = Field(
        "delete",
        description="After quarantining: delete the server copy, keep it, or "
        "{ move = \"Folder\" } (an error folder, where the source can move).",
    )
    header_prefetch: bool = Field(
        True, strict=True, description="Use TOP n 0 when the chain can decide on headers alone."
    )
    acknowledge: Literal["delete"] | MoveAck | FlagAck = Field(
        "delete",
        description="How a processed message is acknowledged when the delete policy "
        "says it is due: 'delete', { move = \"Folder\" } or { flag = \"$Processed\" }; "
        "only what the source supports (MP-04; POP3: delete).",
    )

    @field_validator("acknowledge", "on_quarantine", mode="before")
    @classmethod
    def _ack_shape(cls, value: Any, info: ValidationInfo) -> Any:
        # One clear problem for a value of the wrong shape, not one per union member.
        words = {"acknowledge": ('"delete"', '{ flag = "$Flag" }'),
                 "on_quarantine": ('"delete", "keep"', None)}[str(info.field_name)]
        plain, flag = words
        if isinstance(value, str) and (value == "delete" or (
                info.field_name == "on_quarantine" and value == "keep")):
            return value
        keys = {"move"} | ({"flag"} if flag else set())
        if isinstance(value, dict) and len(value) == 1 and set(value) <= keys:
            return value
        accepted = ", ".join(x for x in (plain, '{ move = "Folder" }', flag) if x)
        raise ValueError(f"expected {accepted}")

    @property
    def quarantine_ack(self) -> Ack | None:
        """How a quarantined message's server copy is acknowledged (None: kept)."""
        if isinstance(self.on_quarantine, MoveAck):
            return Ack(AckKind.MOVE, self.on_quarantine.move)
        return Ack(AckKind.DELETE) if self.on_quarantine == "delete" else None

    @property
    def ack(self) -> Ack:
        """The :class:`mailpipe.source.Ack` that ``acknowledge`` names."""
        if isinstance(self.acknowledge, MoveAck):
            return Ack(AckKind.MOVE, self.acknowledge.move)
        if isinstance(self.acknowledge, FlagAck):
            return Ack(AckKind.FLAG, self.acknowledge.flag)
        return Ack(AckKind.DELETE)


    @field_validator("name")
    @classmethod
    def _not_dots(cls, name: str) -> str:
        # The name is a folder of the quarantine: "." and ".." would escape it.
        if name in (".", ".."):
            raise ValueError("a mailbox name cannot be '.' or '..'")
        return name


class ProcessorRef(BaseModel):
    """One table of ``processors = [...]``: ``use`` plus the processor's own options."""

    model_config = ConfigDict(extra="allow")

    use: str = Field(description="Processor name (see `mailpipe plugins`).")
    name: str | None = Field(
        None, description="Step name in logs and the journal (default: use + position)."
    )


class PipelineConfig(BaseModel):
    """``[pipelines.NAME]``: an ordered chain of processors."""

    model_config = ConfigDict(extra="forbid")

    processors: list[ProcessorRef] = Field(
        default_factory=list, description="Processors, run in this order."
    )
    on_complete: Literal["done", "keep"] = Field(
        "done",
        description="Disposition when no processor decided: 'done' (delete per "
        "policy) or 'keep'.",
    )
    processing_budget: Duration = Field(
        60.0,
        gt=0,
        le=86400,
        description="Time one message may spend in the synchronous processors "
        "(parse, filter, stores; each runs off the event loop on a thread of its "
        "own); past it the call is abandoned and the message quarantined at once "
        "(a call its thread had not begun yet never begins: the message is retried, "
        "the attempt counted).",
    )


class ConfigModel(BaseModel):
    """The whole ``pipeline.toml``."""

    model_config = ConfigDict(extra="forbid")

    state: StateConfig = Field(default_factory=StateConfig)
    quarantine: QuarantineConfig = Field(default_factory=QuarantineConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    mailboxes: list[MailboxConfig] = Field(default_factory=list)
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict)

    # Pipeline names and unique mailbox names are checked by mailpipe.validation, on
    # the raw tables: a model validator here would report the whole file as its value.


@dataclass(frozen=True, slots=True)
class StepSpec:
    """A validated chain step: its position, name, class and options."""

    index: int
    step: str
    use: str
    cls: type[Any]
    options: BaseModel


@dataclass(frozen=True, slots=True)
class MailboxSpec:
    """A validated mailbox: its core settings, source class and source options."""

    config: MailboxConfig
    source_cls: type[Any]
    source_options: BaseModel

    @property
    def name(self) -> str:
        """The mailbox name."""
        return self.config.name


@dataclass(slots=True)
class Config:
    """A loaded, fully validated configuration."""

    path: Path
    model: ConfigModel
    mailboxes: list[MailboxSpec]
    pipelines: dict[str, list[StepSpec]]
    registry: Registry
    secrets: tuple[str, ...] = field(default=())

    @property
    def base_dir(self) -> Path:
        """The folder relative paths resolve against (the config file's)."""
        return self.path.parent

    def resolve(self, path: str) -> Path:
        """Resolve ``path`` against :attr:`base_dir` unless absolute."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def mailbox(self, name: str) -> MailboxSpec:
        """Return the mailbox called ``name`` (KeyError when unknown)."""
        for mb in self.mailboxes:
            if mb.name == name:
                return mb
        raise KeyError(name)


def read_toml(path: Path) -> dict[str, Any]:
    """Read ``path`` as TOML; a syntax error or text that is not UTF-8 is a
    ConfigError with the line."""
    try:
        raw = path.read_bytes()
        # A byte-order mark (Windows editors) is not TOML; the text after it is.
        return tomllib.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        byte = raw[exc.start]
        raise ConfigError(
            str(path),
            [Problem("", f"not UTF-8 text: byte 0x{byte:02x} on line {line}; "
                     "a TOML file is UTF-8 (save it as UTF-8)")],
        ) from None
    except FileNotFoundError:
        raise ConfigError(str(path), [Problem("", "file not found")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            str(path), [Problem("", f"TOML syntax error: {exc}")]
        ) from None
    except OSError as exc:
        raise ConfigError(
            str(path), [Problem("", f"cannot read: {exc.strerror}")]
        ) from None
