"""Generates the configuration reference (Markdown) from the pydantic models.

The README embeds the output between ``<!-- reference:start -->`` and
``<!-- reference:end -->``; a test regenerates it, so the two never drift apart.
Run ``python -m mailpipe.reference`` to print it.
"""

from __future__ import annotations

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
    for marker, name in (("parse_duration", "duration"), ("parse_size", "size")):
        if marker in str(annotation):
            return f"{name} \\| None" if "None" in str(annotation) else name
    simple = isinstance(annotation, type) and not getattr(annotation, "__args__", None)
    text = annotation.__name__ if simple else str(annotation)
    return (
        text.replace("typing.", "")
        .replace("mailpipe.secrets.", "")
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


def main() -> None:
    """Print the reference for the built-in plugins."""
    from mailpipe.plugin_manager import load

    _, registry = load(entry_points=False)
    print(render(registry), end="")


if __name__ == "__main__":
    main()
