"""How a config problem reads: its key path, the value as written (secrets masked)
and what is accepted, from a pydantic ``ValidationError`` or a check of our own.

Every :class:`~mailpipe.errors.Problem` of a :class:`~mailpipe.errors.ConfigError`
is made here, so the report has one form: ``key.path: message (got VALUE)``.
"""

from __future__ import annotations

import json
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from mailpipe.errors import Problem
from mailpipe.secrets import MASK, is_credential, is_secret_name, redact

# Tables whose every value may be a credential whatever its key: HTTP headers
# (X-Custom = "..."), a program's environment.
_SECRET_TABLES = re.compile(r"^(headers|env)$", re.I)


def key_path(parts: tuple[int | str, ...] | list[int | str]) -> str:
    """``("mailboxes", 0, "port")`` as ``mailboxes[0].port``; a key that is not a bare
    TOML key is quoted (``pipelines."a b"``)."""
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


def shown(value: Any, loc: str) -> str:
    """``value`` of the key at ``loc`` as a report shows it: JSON, at most 80
    characters, with secrets masked (by key name, by table, by form, or known)."""
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


def suggestion(word: str, choices: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, else ``";"``."""
    import difflib  # only when there is a mistake to suggest a fix for

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
        return field_names(current)
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


def problems_from(
    exc: ValidationError,
    prefix: tuple[int | str, ...],
    fields: list[str],
    model: type[BaseModel] | None = None,
    raw: Any = _ABSENT,
) -> list[Problem]:
    """One Problem per error of ``exc``, its key path prefixed with ``prefix``.

    ``fields`` are the keys accepted at the top of the validated table (offered for
    an unknown key); ``model`` finds them for nested tables. ``raw`` is the table
    that was validated, so a value is shown as written in the TOML ("0s"), not as
    parsed (0.0).
    """
    out = []
    for err in exc.errors(include_url=False):
        loc_parts = (*prefix, *err["loc"])
        loc = key_path(loc_parts)
        msg = str(err["msg"]).removeprefix("Value error, ")
        written = _raw_at(raw, tuple(err["loc"]))
        got = err.get("input") if written is _ABSENT else written
        value: str | None = shown(got, loc)
        if err["type"] in _EXPECTED_TYPE:
            msg = _type_message(err["type"], got)
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1]) if err["loc"] else ""
            parent_fields = fields if len(err["loc"]) == 1 else []
            if not parent_fields and model is not None:
                parent_fields = _fields_at(model, tuple(err["loc"][:-1]))
            hint = suggestion(key, parent_fields).rstrip(";")
            if not hint and parent_fields:
                hint = f"; accepted: {', '.join(sorted(parent_fields))}"
            msg = "unknown key" + hint
            value = None
        elif err["type"] == "missing":
            msg = "required key is missing"
            value = None
        out.append(Problem(loc, msg, value))
    return out


def field_names(model: type[BaseModel]) -> list[str]:
    """The keys ``model`` accepts."""
    return list(model.model_fields)
