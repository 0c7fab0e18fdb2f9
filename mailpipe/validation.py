"""Validate parsed ``pipeline.toml`` data against the models and the plugins' options.

Phase 1 checks the core structure (``[state]``, ``[[mailboxes]]``,
``[pipelines.NAME]``...) with the ``extra="forbid"`` models of :mod:`mailpipe.config`.
Phase 2 walks the raw tables: each mailbox's source keys and each processor table are
validated against the ``Options`` model of the plugin it names, with the table path
prefixed, and the cross-references (pipeline names, unique mailbox names, the pipeline
a mailbox runs, an acknowledgement the source supports, folders that are files) are
checked. Problems from both phases are collected and raised once as
:class:`~mailpipe.errors.ConfigError`; each is rendered by :mod:`mailpipe.problems`.
Reading the file and choosing the plugins is :func:`mailpipe.app.open_app`'s part.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from mailpipe.config import (
    Config,
    ConfigModel,
    MailboxConfig,
    MailboxSpec,
    PipelineConfig,
    ProcessorRef,
    StepSpec,
)
from mailpipe.errors import ConfigError, Problem
from mailpipe.problems import (
    field_names,
    key_path,
    problems_from,
    shown,
    suggestion,
)
from mailpipe.registry import Registry
from mailpipe.source import Ack, AckKind, acknowledgements_of

_PIPELINE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def validate_config(
    data: dict[str, Any], *, path: Path, registry: Registry
) -> Config:
    """Validate parsed TOML ``data`` of the file ``path`` against ``registry``'s plugins.

    Relative paths and secret files resolve against ``path``'s folder.

    :raises ConfigError: with every problem found, each naming its key path.
    :raises PluginError: when a lazily registered plugin class cannot be imported.
    """
    ctx = {"base_dir": str(path.parent.resolve())}
    problems: list[Problem] = []
    try:
        model = ConfigModel.model_validate(data, context=ctx)
    except ValidationError as exc:
        problems.extend(
            problems_from(exc, (), field_names(ConfigModel), ConfigModel, raw=data)
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

    # Phase 2 walks the raw tables, so an entry with a core mistake still has its
    # plugin options checked and every key path keeps the index it has in the file.
    raw_pipes = data.get("pipelines")
    raw_pipes = raw_pipes if isinstance(raw_pipes, dict) else {}
    problems.extend(
        Problem(
            key_path(("pipelines", pname)),
            "a pipeline name is 1-64 of A-Z a-z 0-9 _ . -",
            shown(pname, "pipelines"),
        )
        for pname in raw_pipes
        if not _PIPELINE_NAME.match(pname)
    )
    raw_mbs = data.get("mailboxes")
    mailboxes = _validate_mailboxes(
        raw_mbs if isinstance(raw_mbs, list) else [],
        list(raw_pipes),
        registry,
        ctx,
        problems,
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


def _validate_mailboxes(
    raw_mbs: list[Any],
    pipeline_names: list[str],
    registry: Registry,
    ctx: dict[str, str],
    problems: list[Problem],
) -> list[MailboxSpec]:
    """Each raw ``[[mailboxes]]`` table: unique name, source options, its pipeline."""
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
                        shown(name, "name"),
                    )
                )
            names.setdefault(name, i)
        spec = _validate_mailbox(i, raw, registry, ctx, problems)
        if spec is not None:
            mailboxes.append(spec)
        pipeline = raw.get("pipeline", "default")
        if isinstance(pipeline, str) and pipeline not in pipeline_names:
            problems.append(
                Problem(
                    f"mailboxes[{i}].pipeline",
                    f"no [pipelines.{pipeline}] table"
                    + suggestion(pipeline, pipeline_names)
                    + f" Defined: {', '.join(sorted(pipeline_names)) or 'none'}.",
                    shown(pipeline, "pipeline"),
                )
            )
    return mailboxes


def _not_a_folder(loc: str, value: str, base_dir: Path) -> Problem | None:
    """A Problem when the folder ``value`` (created when missing) cannot be one: it,
    or the nearest of its parents that exists, is a file. Nothing is created."""
    folder = Path(value).expanduser()
    existing = folder if folder.is_absolute() else base_dir / folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() or not existing.exists():
        return None
    return Problem(loc, f"{existing} is a file, not a folder", shown(value, loc))


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
                key_path((*where, "source")),
                f"unknown source {source!r}"
                + suggestion(source, names)
                + f"; available: {', '.join(names) or 'none'}",
                shown(source, "source"),
            )
        )
        return None
    cls = registry.source(source)
    extras = {k: v for k, v in raw.items() if k not in MailboxConfig.model_fields}
    try:
        options = cls.Options.model_validate(extras, context=ctx)
    except ValidationError as exc:
        fields = field_names(cls.Options) + field_names(MailboxConfig)
        problems.extend(problems_from(exc, where, fields, cls.Options, raw=extras))
        return None
    try:
        mb = MailboxConfig.model_validate(raw, context=ctx)
    except ValidationError:
        return None  # reported by phase 1
    supported = acknowledgements_of(cls)
    wanted = [("acknowledge", mb.ack)]
    if mb.quarantine_ack is not None:
        wanted.append(("on_quarantine", mb.quarantine_ack))
    if mb.on_oversize == "delete":
        wanted.append(("on_oversize", Ack(AckKind.DELETE)))
    refused = [(key, ack) for key, ack in wanted if ack.kind not in supported]
    for key, ack in refused:
        # MP-04: an acknowledgement the source cannot perform is a config error, not
        # a run-time surprise after the first message was processed.
        default = " (the default)" if key not in raw else ""
        problems.append(
            Problem(
                key_path((*where, key)),
                f"source {source!r} cannot acknowledge with {ack.kind.value!r}{default}; "
                "it supports: " + ", ".join(sorted(k.value for k in supported
                                                   if k is not AckKind.KEEP)),
                shown(raw.get(key, ack.kind.value), key),
            )
        )
    if refused:
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
                    key_path((*where, "use")),
                    f"unknown processor {ref.use!r}"
                    + suggestion(ref.use, names)
                    + f" Available: {', '.join(names) or 'none'}.",
                    shown(ref.use, "use"),
                )
            )
            continue
        cls = registry.processor(ref.use)
        table = dict(ref.model_extra or {})
        try:
            options = cls.Options.model_validate(table, context=ctx)
        except ValidationError as exc:
            fields = [*field_names(cls.Options), "use", "name"]
            problems.extend(problems_from(exc, where, fields, cls.Options, raw=table))
            continue
        step = ref.name or f"{j}:{ref.use}"
        if step in seen:
            problems.append(
                Problem(key_path((*where, "name")), "step name used twice", step)
            )
        seen.add(step)
        steps.append(
            StepSpec(index=j, step=step, use=ref.use, cls=cls, options=options)
        )
    return steps
