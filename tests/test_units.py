"""Durations and sizes: accepted spellings, values, and clear errors."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mailpipe.units import ByteSize, Duration, parse_duration, parse_size


class Timing(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout: Duration = Field(30.0, description="a duration")
    limit: ByteSize = Field(0, description="a size")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("60s", 60.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("0.5m", 30.0),
        ("90", 90.0),
        (" 10 s ", 10.0),
        ("5M", 300.0),
        ("0s", 0.0),
        (1.5, 1.5),
        (45, 45.0),
        (0, 0.0),
    ],
    ids=repr,
)
def test_parse_duration_accepts(text: Any, seconds: float) -> None:
    result = parse_duration(text)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad",
    ["", "s", "5 minutes", "-5s", "5x", "1h30m", "five", "5ss", "1e3s", True, None, [5], {}],
    ids=repr,
)
def test_parse_duration_rejects_with_example(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"expected a duration such as '30s', '5m'"):
        parse_duration(bad)


@pytest.mark.parametrize("bad", [-1, -0.5])
def test_parse_duration_rejects_negative_numbers(bad: float) -> None:
    with pytest.raises(ValueError, match="a duration cannot be negative"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "octets"),
    [
        ("50MB", 50_000_000),
        ("512KiB", 512 * 1024),
        ("1GiB", 1024**3),
        ("1.5GB", 1_500_000_000),
        ("10mb", 10_000_000),
        ("2 MiB", 2 * 1024**2),
        ("100", 100),
        ("100B", 100),
        ("3k", 3000),
        ("1TiB", 1024**4),
        (4096, 4096),
        (0, 0),
    ],
    ids=repr,
)
def test_parse_size_accepts(text: Any, octets: int) -> None:
    result = parse_size(text)
    assert isinstance(result, int)
    assert result == octets


@pytest.mark.parametrize(
    "bad",
    ["", "MB", "50XB", "50 megabytes", "-5MB", "5PB", "1e6", True, None, 1.5, [1]],
    ids=repr,
)
def test_parse_size_rejects_with_example(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"expected a size such as '50MB', '512KiB'"):
        parse_size(bad)


def test_parse_size_rejects_negative_integers() -> None:
    with pytest.raises(ValueError, match="a size cannot be negative"):
        parse_size(-1)


def test_units_in_a_pydantic_model() -> None:
    model = Timing.model_validate({"timeout": "5m", "limit": "50MB"})
    assert model.timeout == 300.0
    assert model.limit == 50_000_000
    assert Timing().timeout == 30.0


def test_duration_serialises_back_to_seconds_text() -> None:
    model = Timing.model_validate({"timeout": "250ms", "limit": 10})
    dumped = model.model_dump()
    assert dumped == {"timeout": "0.25s", "limit": 10}
    # What is dumped validates back to the same value.
    assert Timing.model_validate(dumped) == model


def test_bad_units_in_a_model_name_the_field_and_the_expectation() -> None:
    with pytest.raises(ValidationError) as info:
        Timing.model_validate({"timeout": "5 minutes", "limit": "lots"})
    errors = {e["loc"][0]: e["msg"] for e in info.value.errors()}
    assert set(errors) == {"timeout", "limit"}
    assert "expected a duration such as '30s'" in errors["timeout"]
    assert "expected a size such as '50MB'" in errors["limit"]
