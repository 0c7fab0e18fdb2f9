"""Load and validate ``pipeline.toml``: every problem at once, each naming its key path.

Validation runs in two phases. Phase 1 checks the core structure (``[state]``,
``[[mailboxes]]``, ``[pipelines.NAME]``...) with ``extra="forbid"`` models. Phase 2
validates each mailbox's source keys and each processor table against the ``Options``
model of the plugin it names, with the table path prefixed. Problems from both phases are
collected and raised once as :class:`~mailpipe.errors.ConfigError`, rendered as
``FILE: key.path: message (got VALUE)``.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from mailpipe.errors import ConfigError, Problem
from mailpipe.registry import Registry
from mailpipe.secrets import (
    MASK,
    Secret,
    is_credential,
    is_secret_name,
    redact,
    remember_secret,
    remember_url_password,
)
from mailpipe.source import Ack, AckKind, acknowledgements_of
from mailpipe.units import ByteSize, Duration

_DELETE_RE = re.compile(r"^after_days:(\d+(?:\.\d+)?)$")
# Tables whose every value may be a credential whatever its key: HTTP headers
# (X-Custom = "..."), a program's environment.
_SECRET_TABLES = re.compile(r"^(headers|env)$", re.I)
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
        4, strict=True, ge=1, le=10000, description="Mailboxes polled at the same time."
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
        description="QUIT and reconnect every N messages (0 = one session for all).",
    )
    max_attempts: int = Field(
        3, strict=True, ge=1, description="Failed attempts before a message is quarantined."
    )
    on_quarantine: Literal["delete", "keep"] = Field(
        "delete", description="After quarantining: delete the server copy or keep it."
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
        "own); past it the call is abandoned and the message quarantined at once.",
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

    # Pipeline names and unique mailbox names are checked in validate_config, on the
    # raw tables: a model validator here would report the whole file as its value.


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


# --- rendering ------------------------------------------------------------------


def _loc(parts: tuple[int | str, ...] | list[int | str]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            if not re.match(r"^[A-Za-z0-9_-]+$", text):
                text = json.dumps(text)
            out += f".{text}" if out else text
    return out


def _masked(value: Any, *, every: bool = False) -> Any:
    """``value`` with its credentials masked at any depth: the values of secret-named
    keys, every value of a header or environment table (``every``), and values that
    read as an HTTP credential ("Bearer ..."). Tables are echoed whole before their
    secrets were resolved, so :func:`redact` cannot know them yet."""
    if isinstance(value, dict):
        return {
            k: MASK
            if (every or is_secret_name(str(k))) and not isinstance(v, dict)
            else _masked(v, every=every or bool(_SECRET_TABLES.match(str(k))))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_masked(v, every=every) for v in value]
    if isinstance(value, str) and (every or is_credential(value)):
        return MASK
    if isinstance(value, str):
        # Each string before JSON encoding: an escaped quote or backslash would
        # otherwise hide a known secret from redact() (review of issue 20 item 8).
        return redact(value)
    return value


def _show(value: Any, loc: str) -> str:
    key = loc.rsplit(".", 1)[-1]
    if is_secret_name(key) and not isinstance(value, dict):
        return MASK
    value = _masked(value, every=bool(_SECRET_TABLES.match(key)))
    if value == MASK:
        return MASK
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    text = redact(text)  # before cutting: a cut secret would no longer match
    if len(text) > 80:
        text = text[:77] + "..."
    return text


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ";"


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys of the table at ``loc`` (a path from ``model``), or [] when unknown."""
    current: Any = model
    skip = False  # the next part is a list index or a dict key, not a field
    for part in loc:
        if skip:
            skip = False
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        info = current.model_fields.get(str(part))
        if info is None:
            return []
        current = info.annotation
        if typing.get_origin(current) in (list, dict):
            current = typing.get_args(current)[-1]
            skip = True
    if isinstance(current, type) and issubclass(current, BaseModel) and not skip:
        return _fields(current)
    return []


# A TOML scalar of the wrong type (strict fields): what is accepted, by error type.
_EXPECTED_TYPE = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}


def _type_message(kind: str, value: Any) -> str:
    """``expected <type>``, plus how to write a quoted value that has the right form."""
    msg = f"expected {_EXPECTED_TYPE[kind]}"
    if not isinstance(value, str):
        return msg
    text = value.strip()
    if kind.startswith("int") and re.fullmatch(r"[+-]?\d+", text):
        return f"{msg}; write {int(text)} without quotes"
    if kind.startswith("float") and re.fullmatch(r"[+-]?\d+(\.\d+)?", text):
        return f"{msg}; write {text} without quotes"
    if kind.startswith("bool") and text.lower() in ("true", "false"):
        return f"{msg}; write {text.lower()} without quotes"
    return msg


_ABSENT = object()


def _raw_at(raw: Any, loc: tuple[int | str, ...]) -> Any:
    """The value at ``loc`` in the raw TOML table ``raw``, or ``_ABSENT``."""
    for part in loc:
        in_table = isinstance(raw, dict) and part in raw
        in_array = isinstance(raw, list) and isinstance(part, int) and part < len(raw)
        if not (in_table or in_array):
            return _ABSENT
        raw = raw[part]
    return raw


def _problems(
    exc: ValidationError,
    prefix: tuple[int | str, ...],
    fields: list[str],
    model: type[BaseModel] | None = None,
    raw: Any = _ABSENT,
) -> list[Problem]:
    """One Problem per error of ``exc``; ``raw`` is the table that was validated, so
    a value is shown as written in the TOML ("0s"), not as parsed (0.0)."""
    out = []
    for err in exc.errors(include_url=False):
        loc_parts = (*prefix, *err["loc"])
        loc = _loc(loc_parts)
        msg = str(err["msg"]).removeprefix("Value error, ")
        written = _raw_at(raw, tuple(err["loc"]))
        got = err.get("input") if written is _ABSENT else written
        value: str | None = _show(got, loc)
        if err["type"] in _EXPECTED_TYPE:
            msg = _type_message(err["type"], got)
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1]) if err["loc"] else ""
            parent_fields = fields if len(err["loc"]) == 1 else []
            if not parent_fields and model is not None:
                parent_fields = _fields_at(model, tuple(err["loc"][:-1]))
            hint = _suggest(key, parent_fields).rstrip(";")
            if not hint and parent_fields:
                hint = f"; accepted: {', '.join(sorted(parent_fields))}"
            msg = "unknown key" + hint
            value = None
        elif err["type"] == "missing":
            msg = "required key is missing"
            value = None
        out.append(Problem(loc, msg, value))
    return out


def _fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


# --- loading --------------------------------------------------------------------


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


def load_config(
    path: str | Path,
    *,
    registry: Registry | None = None,
    entry_points: bool = True,
) -> Config:
    """Load ``path`` and validate it completely.

    :param registry: use these plugin classes instead of building a plugin manager
        (which honours ``[plugins] disable`` and ``MAILPIPE_DISABLE_PLUGINS``).
    :raises ConfigError: with every problem found, each naming its key path.
    :raises PluginError: when a plugin cannot be loaded.
    """
    path = Path(path)
    data = read_toml(path)
    return validate_config(
        data, path=path, registry=registry, entry_points=entry_points
    )


def validate_config(
    data: dict[str, Any],
    *,
    path: Path,
    registry: Registry | None = None,
    entry_points: bool = True,
) -> Config:
    """Validate already-parsed TOML ``data`` (see :func:`load_config`)."""
    base_dir = path.parent.resolve()
    ctx = {"base_dir": str(base_dir)}
    problems: list[Problem] = []
    try:
        model = ConfigModel.model_validate(data, context=ctx)
    except ValidationError as exc:
        problems.extend(
            _problems(exc, (), _fields(ConfigModel), ConfigModel, raw=data)
        )
        model = _salvage(data, ctx, problems)
    ctx["state_path"] = model.state.path  # the OAuth token cache lives in the journal

    for loc, folder in (
        ("scheduler.spool_dir", model.scheduler.spool_dir),
        ("quarantine.dir", model.quarantine.dir),
    ):
        problem = _not_a_folder(loc, folder, path.parent)
        if problem is not None:
            problems.append(problem)

    if registry is None:
        from mailpipe.plugin_manager import load

        _, registry = load(entry_points=entry_points, blocked=model.plugins.disable)

    # Phase 2 walks the raw tables, so an entry with a core mistake still has its
    # plugin options checked and every key path keeps the index it has in the file.
    raw_pipes = data.get("pipelines")
    raw_pipes = raw_pipes if isinstance(raw_pipes, dict) else {}
    for pname in raw_pipes:
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", pname):
            problems.append(
                Problem(
                    _loc(("pipelines", pname)),
                    "a pipeline name is 1-64 of A-Z a-z 0-9 _ . -",
                    _show(pname, "pipelines"),
                )
            )
    raw_mbs = data.get("mailboxes")
    raw_mbs = raw_mbs if isinstance(raw_mbs, list) else []
    mailboxes: list[MailboxSpec] = []
    names: dict[str, int] = {}
    for i, raw in enumerate(raw_mbs):
        if not isinstance(raw, dict):
            continue  # reported by phase 1
        name = raw.get("name")
        if isinstance(name, str):
            if name in names:
                problems.append(
                    Problem(
                        f"mailboxes[{i}].name",
                        f"mailbox name already used by mailboxes[{names[name]}]; "
                        "names must be unique",
                        _show(name, "name"),
                    )
                )
            names.setdefault(name, i)
        spec = _validate_mailbox(i, raw, registry, ctx, problems)
        if spec is not None:
            mailboxes.append(spec)
        pipeline = raw.get("pipeline", "default")
        if isinstance(pipeline, str) and pipeline not in raw_pipes:
            problems.append(
                Problem(
                    f"mailboxes[{i}].pipeline",
                    f"no [pipelines.{pipeline}] table"
                    + _suggest(pipeline, list(raw_pipes))
                    + f" Defined: {', '.join(sorted(raw_pipes)) or 'none'}.",
                    _show(pipeline, "pipeline"),
                )
            )

    pipelines: dict[str, list[StepSpec]] = {}
    for pname, pipe in raw_pipes.items():
        if isinstance(pipe, dict) and isinstance(pipe.get("processors"), list):
            pipelines[pname] = _validate_pipeline(
                pname, pipe["processors"], registry, ctx, problems
            )

    if problems:
        raise ConfigError(str(path), problems)
    return Config(
        path=path,
        model=model,
        mailboxes=mailboxes,
        pipelines=pipelines,
        registry=registry,
    )


def _not_a_folder(loc: str, value: str, base_dir: Path) -> Problem | None:
    """A Problem when the folder ``value`` (created when missing) cannot be one: it,
    or the nearest of its parents that exists, is a file. Nothing is created."""
    folder = Path(value).expanduser()
    existing = folder if folder.is_absolute() else base_dir / folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() or not existing.exists():
        return None
    return Problem(loc, f"{existing} is a file, not a folder", _show(value, loc))


def _salvage(
    data: dict[str, Any], ctx: dict[str, str], problems: list[Problem]
) -> ConfigModel:
    """Validate what can be validated so phase 2 still reports plugin problems."""
    kept: dict[str, Any] = {}
    for key in ConfigModel.model_fields:
        if key not in data:
            continue
        try:
            ConfigModel.model_validate({key: data[key]}, context=ctx)
        except ValidationError:
            if key == "mailboxes" and isinstance(data[key], list):
                kept[key] = [m for m in data[key] if _valid(MailboxConfig, m, ctx)]
            elif key == "pipelines" and isinstance(data[key], dict):
                kept[key] = {
                    k: v for k, v in data[key].items() if _valid(PipelineConfig, v, ctx)
                }
            continue
        kept[key] = data[key]
    try:
        return ConfigModel.model_validate(kept, context=ctx)
    except ValidationError:
        return ConfigModel()


def _valid(model: type[BaseModel], value: Any, ctx: dict[str, str]) -> bool:
    try:
        model.model_validate(value, context=ctx)
    except ValidationError:
        return False
    return True


def _validate_mailbox(
    i: int,
    raw: dict[str, Any],
    registry: Registry,
    ctx: dict[str, str],
    problems: list[Problem],
) -> MailboxSpec | None:
    """Check the source options of the raw mailbox table ``raw`` (``mailboxes[i]``);
    the core keys were checked in phase 1. Returns a spec when both are valid."""
    where = ("mailboxes", i)
    source = raw.get("source", "pop3")
    if not isinstance(source, str):
        return None  # reported by phase 1
    if source not in registry.sources:
        names = sorted(registry.sources)
        problems.append(
            Problem(
                _loc((*where, "source")),
                f"unknown source {source!r}"
                + _suggest(source, names)
                + f"; available: {', '.join(names) or 'none'}",
                _show(source, "source"),
            )
        )
        return None
    cls = registry.source(source)
    extras = {k: v for k, v in raw.items() if k not in MailboxConfig.model_fields}
    try:
        options = cls.Options.model_validate(extras, context=ctx)
    except ValidationError as exc:
        fields = _fields(cls.Options) + _fields(MailboxConfig)
        problems.extend(_problems(exc, where, fields, cls.Options, raw=extras))
        return None
    try:
        mb = MailboxConfig.model_validate(raw, context=ctx)
    except ValidationError:
        return None  # reported by phase 1
    supported = acknowledgements_of(cls)
    if mb.ack.kind not in supported:
        # MP-04: an acknowledgement the source cannot perform is a config error, not
        # a run-time surprise after the first message was processed.
        problems.append(
            Problem(
                _loc((*where, "acknowledge")),
                f"source {source!r} cannot acknowledge with {mb.ack.kind.value!r}; "
                "it supports: " + ", ".join(sorted(k.value for k in supported
                                                   if k is not AckKind.KEEP)),
                _show(raw.get("acknowledge"), "acknowledge"),
            )
        )
        return None
    return MailboxSpec(config=mb, source_cls=cls, source_options=options)


def _validate_pipeline(
    pname: str,
    processors: list[Any],
    registry: Registry,
    ctx: dict[str, str],
    problems: list[Problem],
) -> list[StepSpec]:
    """Check each raw processor table of ``[pipelines.PNAME]`` against its Options."""
    steps: list[StepSpec] = []
    seen: set[str] = set()
    for j, raw in enumerate(processors):
        where: tuple[int | str, ...] = ("pipelines", pname, "processors", j)
        try:
            ref = ProcessorRef.model_validate(raw, context=ctx)
        except ValidationError:
            continue  # reported by phase 1
        if ref.use not in registry.processors:
            names = sorted(registry.processors)
            problems.append(
                Problem(
                    _loc((*where, "use")),
                    f"unknown processor {ref.use!r}"
                    + _suggest(ref.use, names)
                    + f" Available: {', '.join(names) or 'none'}.",
                    _show(ref.use, "use"),
                )
            )
            continue
        cls = registry.processor(ref.use)
        table = dict(ref.model_extra or {})
        try:
            options = cls.Options.model_validate(table, context=ctx)
        except ValidationError as exc:
            fields = [*_fields(cls.Options), "use", "name"]
            problems.extend(_problems(exc, where, fields, cls.Options, raw=table))
            continue
        step = ref.name or f"{j}:{ref.use}"
        if step in seen:
            problems.append(
                Problem(_loc((*where, "name")), "step name used twice", step)
            )
        seen.add(step)
        steps.append(
            StepSpec(index=j, step=step, use=ref.use, cls=cls, options=options)
        )
    return steps


def json_schema(registry: Registry) -> dict[str, Any]:
    """Return the JSON Schema of the whole config file, plugin options included."""
    schema = ConfigModel.model_json_schema()
    defs = schema.setdefault("$defs", {})

    proc_variants = []
    for name, entry in sorted(registry.processors.items()):
        sub = entry.cls.Options.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        props = dict(sub.get("properties", {}))
        props["use"] = {"const": name, "description": "Processor name."}
        props["name"] = {"type": "string", "description": "Step name."}
        proc_variants.append(
            {
                "type": "object",
                "title": name,
                "properties": props,
                "required": ["use", *sub.get("required", [])],
                "additionalProperties": False,
            }
        )
    defs["ProcessorRef"] = (
        {"anyOf": proc_variants} if proc_variants else defs.get("ProcessorRef", {})
    )

    mb = defs.get("MailboxConfig", {})
    core_props = dict(mb.get("properties", {}))
    variants = []
    for name, entry in sorted(registry.sources.items()):
        sub = entry.cls.Options.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        props = {**core_props, **sub.get("properties", {})}
        props["source"] = {
            "const": name,
            "default": "pop3",
            "description": "Source plugin.",
        }
        variants.append(
            {
                "type": "object",
                "title": f"mailbox ({name})",
                "properties": props,
                "required": ["name", *sub.get("required", [])],
                "additionalProperties": False,
            }
        )
    if variants:
        defs["MailboxConfig"] = {"anyOf": variants}
    schema["title"] = "mailpipe pipeline.toml"
    return schema
