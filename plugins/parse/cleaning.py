"""Lone surrogates out of a record's strings, so that it is valid Unicode and JSON.

The stdlib parser keeps undecodable octets as lone surrogates (surrogate escapes),
and odd charsets (UTF-7) can leave some too. ``_clean_record`` returns a record's
fields with every lone surrogate replaced (a string's undecoded octets decoded as
UTF-8 where they form it, the rest as U+FFFD; in a string with any other lone
surrogate, every one becomes U+FFFD), and the same dict, uncopied, when none is there
(the common case, found by one search).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from typing import Any, Final

from pydantic import BaseModel

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean_record(fields: dict[str, Any]) -> dict[str, Any]:
    """:func:`_clean` of a whole record, ``fields`` itself when it has no lone
    surrogate: one search over all its strings (joining strings never pairs two
    surrogates: a Python str holds code points) instead of a copy of every container
    (issue 18: a quarter of the time of ``_record`` on small messages)."""
    texts: list[str] = []
    _texts(fields, texts)
    if not _has_surrogate("".join(texts)):
        return fields
    cleaned: dict[str, Any] = _clean(fields)
    return cleaned


def _texts(value: Any, out: list[str]) -> None:
    """Append to ``out`` every string value inside ``value``, where :func:`_clean`
    looks: dict values, list and tuple items, pydantic model fields."""
    if isinstance(value, str):
        out.append(value)
        return
    if isinstance(value, dict):
        items: Iterable[Any] = value.values()
    elif isinstance(value, list | tuple):
        items = value
    elif isinstance(value, BaseModel):
        items = [getattr(value, name) for name in type(value).model_fields]
    else:
        return
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _CONTAINERS):
            _texts(item, out)


_CONTAINERS: Final = (dict, list, tuple, BaseModel)


def _has_surrogate(text: str) -> bool:
    """True when ``text`` holds a surrogate code point: the one thing a strict UTF-8
    encode refuses (a C loop; the regex search was slower on long bodies, issue 18)."""
    if text.isascii():  # a flag of the string: no scan
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _clean(value: Any) -> Any:
    """Replace lone surrogates (undecoded octets, UTF-7 oddities) so records are valid
    Unicode and serialise as JSON; returns ``value`` itself when nothing changes."""
    if isinstance(value, str):
        if not _has_surrogate(value):
            return value
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            return _LONE_SURROGATE.sub("\ufffd", value)
    # An ASCII str (a flag, no scan) is clean: skipped without a call (issue 18).
    if isinstance(value, dict):
        out = {
            k: v if type(v) is str and v.isascii() else _clean(v)
            for k, v in value.items()
        }
        return value if all(map(operator.is_, out.values(), value.values())) else out
    if isinstance(value, list | tuple):
        items = [v if type(v) is str and v.isascii() else _clean(v) for v in value]
        if all(map(operator.is_, items, value)):
            return value
        return type(value)(items) if isinstance(value, tuple) else items
    if isinstance(value, BaseModel):
        data = {k: getattr(value, k) for k in type(value).model_fields}
        cleaned = _clean(data)
        return value if cleaned is data else type(value).model_validate(cleaned)
    return value
