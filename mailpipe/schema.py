"""The JSON Schema of ``pipeline.toml``, the options of every registered plugin included.

``mailpipe schema`` prints it; editors use it to complete and check the file. A mailbox
is one variant per source plugin (the core keys plus that source's options) and a
processor table one variant per processor plugin, each closed to unknown keys.
"""

from __future__ import annotations

from typing import Any

from mailpipe.config import ConfigModel
from mailpipe.registry import Registry


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
