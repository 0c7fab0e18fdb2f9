"""Durations ("60s", "5m") and sizes ("50MB") as pydantic types with clear errors."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_duration(value: Any) -> float:
    """Return seconds for ``value``: a number (seconds) or ``"<n>ms|s|m|h|d"``."""
    if isinstance(value, bool):
        raise ValueError(
            "expected a duration such as '30s', '5m', '1h' or a number of seconds"
        )
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]
    raise ValueError(
        "expected a duration such as '30s', '5m', '1h' or a number of seconds"
    )


def parse_size(value: Any) -> int:
    """Return octets for ``value``: an integer or ``"<n>KB|MB|GB|KiB|MiB|GiB"``."""
    if isinstance(value, bool):
        raise ValueError(
            "expected a size such as '50MB', '512KiB' or a number of bytes"
        )
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and (m.group(2) or "").lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])
    raise ValueError("expected a size such as '50MB', '512KiB' or a number of bytes")


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(lambda v: f"{v:g}s", return_type=str),
]
"""Seconds, written in TOML as ``"30s"``, ``"5m"``, ``"1h"``, ``"250ms"`` or a number."""

ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""Octets, written in TOML as ``"50MB"``, ``"512KiB"`` or an integer."""
