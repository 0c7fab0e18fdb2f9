"""Generates the configuration reference (Markdown) from the pydantic models.

The README embeds the output between ``<!-- reference:start -->`` and
``<!-- reference:end -->``; a test regenerates it, so the two never drift apart.
Run ``python -m mailpipe.reference`` to print it.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from mailpipe.config import (
    MailboxConfig,
    MetricsConfig,
    PipelineConfig,
    PluginsConfig,
    QuarantineConfig,
    SchedulerConfig,
    StateConfig,
)
from mailpipe.registry import Registry

START, END = "<!-- reference:start -->", "<!-- reference:end -->"


def _type(field: Any) -> str:
    from mailpipe.units import parse_duration, parse_size

    for meta in field.metadata:
        func = getattr(meta, "func", None)
        if func is parse_duration:
            return "duration"
        if func is parse_size:
            return "size"
    annotation = field.annotation
    for marker, name in (
        ("parse_duration", "duration"),
        ("parse_size", "size"),
        ("ProviderTable", "oauth table"),  # mailpipe.oauth.table.OAuthOptions
    ):
        if marker in str(annotation):
            return f"{name} \\| None" if "None" in str(annotation) else name
    simple = isinstance(annotation, type) and not getattr(annotation, "__args__", None)
    text = annotation.__name__ if simple else str(annotation)
    text = re.sub(r"Annotated\[(\w+), Strict\(strict=True\)\]", r"\1", text)
    return (
        text.replace("typing.", "")
        .replace("mailpipe.secrets.", "")
        .replace("mailpipe.config.", "")
        .replace("pathlib.", "")
        .replace("NoneType", "None")
        .replace("|", "\\|")
    )


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else "`[]`"
    value = field.default
    if value is None:
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> str:
    """Return a Markdown table of ``model``'s fields: key, type, default, meaning."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name}` | {_type(field)} | {_default(field)} | {desc} |")
    return "\n".join(rows)


def render(registry: Registry) -> str:
    """Return the whole reference: core tables, then every plugin's options."""
    parts = [
        "### `[state]`",
        table(StateConfig),
        "### `[quarantine]`",
        table(QuarantineConfig),
        "### `[scheduler]`",
        table(SchedulerConfig),
        "### `[plugins]`",
        table(PluginsConfig),
        "### `[metrics]`",
        table(MetricsConfig),
        "### `[[mailboxes]]` (core keys; the rest belong to the source)",
        table(MailboxConfig),
        "### `[pipelines.NAME]`",
        table(PipelineConfig),
    ]
    for name, entry in sorted(registry.sources.items()):
        parts += [
            f"### source `{name}` (keys of `[[mailboxes]]`)",
            table(entry.cls.Options),
        ]
    for name, entry in sorted(registry.processors.items()):
        doc = (entry.cls.__doc__ or "").strip().splitlines()
        parts += [
            f"### processor `{name}`",
            (doc[0] if doc else ""),
            table(entry.cls.Options),
        ]
    return "\n\n".join(p for p in parts if p) + "\n"


def splice(text: str, reference: str) -> str:
    """Return ``text`` with what lies between :data:`START` and :data:`END` replaced."""
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n\n{reference.strip()}\n\n{END}{tail}"


def main(argv: list[str] | None = None) -> None:
    """Print the reference for the built-in plugins, or with ``--write FILE`` splice it
    into FILE between the reference markers (``--write README.md``)."""
    import sys
    from pathlib import Path

    from mailpipe.plugin_manager import load

    args = sys.argv[1:] if argv is None else argv
    _, registry = load(entry_points=False)
    reference = render(registry)
    if args[:1] == ["--write"] and len(args) == 2:
        path = Path(args[1])
        path.write_text(splice(path.read_text(), reference))
    elif args:
        sys.exit("usage: python -m mailpipe.reference [--write README.md]")
    else:
        print(reference, end="")


if __name__ == "__main__":
    main()
