"""Filter rules: a `when` condition and a `then` action, with errors that name the rule."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .conditions import CONDITION_KEYS, Condition

Verb = Literal["drop", "keep", "quarantine", "continue"]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class TagAction(BaseModel):
    """Add labels that later processors and stores see, then evaluate the next rule."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    tag: Annotated[list[str], BeforeValidator(_as_list)] = Field(
        min_length=1, description="Tags to add."
    )


class RouteAction(BaseModel):
    """Continue in the named pipeline instead of the rest of this one."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    route: str = Field(min_length=1, description="Name of a [pipelines.NAME] table.")


Action = Verb | TagAction | RouteAction


class Rule(BaseModel):
    """One rule: ``when`` (a condition table) and ``then`` (what to do on a match)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    name: str = Field(
        default="", description='Rule name for logs and reasons; default "rules[i]".'
    )
    when: Condition = Field(description="Condition table; see docs/filter.md.")
    then: Annotated[Action, BeforeValidator(_action)] = Field(
        description='"drop", "keep", "quarantine", "continue", {tag = [...]} or '
        '{route = "pipeline"}.'
    )

    @model_validator(mode="wrap")
    @classmethod
    def _name_errors(cls, data: Any, handler: Any) -> Any:
        """Prefix every validation error inside the rule with the rule's name."""
        try:
            return handler(data)
        except ValidationError as exc:
            name = data.get("name") if isinstance(data, dict) else None
            raise _renamed(exc, str(name or "?")) from None

    def needs_body(self) -> bool:
        """True when the condition needs the message body (not only headers)."""
        return self.when.needs_body()


def _unknown_key_message(loc: tuple[int | str, ...]) -> str | None:
    """Name what was misspelt, from where the unknown key sits."""
    parent = loc[-2] if len(loc) > 1 else None
    grand = loc[-3] if len(loc) > 2 else None
    if parent in ("when", "not") or (
        isinstance(parent, int) and grand in ("all", "any")
    ):
        return f"unknown condition {loc[-1]!r}; known: {', '.join(CONDITION_KEYS)}"
    if parent == "header" or (isinstance(parent, int) and grand == "header"):
        return (
            f"unknown header test key {loc[-1]!r}; "
            "known: name, exists, equals, contains, regex, glob"
        )
    if parent in ("size", "age", "attachment_count"):
        return f"unknown bound {loc[-1]!r}; known: gt, ge, lt, le, eq"
    if parent is not None:
        return f"unknown key {loc[-1]!r}; known: equals, contains, regex, glob"
    return None


def _renamed(exc: ValidationError, rule: str) -> ValidationError:
    details: list[InitErrorDetails] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _unknown_key_message(loc) or msg
        details.append(
            InitErrorDetails(
                type=PydanticCustomError(
                    "filter_rule",
                    "rule {rule}: {msg}",
                    {"rule": repr(rule), "msg": msg},
                ),
                loc=loc,
                input=err.get("input"),
            )
        )
    return ValidationError.from_exception_data(exc.title, details)


def _action(value: Any) -> Any:
    """Check `then` up front so a typo gives one clear error, not one per union arm."""
    if isinstance(value, str):
        if value not in ("drop", "keep", "quarantine", "continue"):
            raise ValueError(
                f"unknown action {value!r}; expected drop, keep, quarantine, continue, "
                '{tag = [...]} or {route = "pipeline"}'
            )
        return value
    if isinstance(value, dict) and set(value) == {"tag"}:
        return _validated(TagAction, value)
    if isinstance(value, dict) and set(value) == {"route"}:
        return _validated(RouteAction, value)
    if isinstance(value, TagAction | RouteAction):
        return value
    raise ValueError(
        'expected "drop", "keep", "quarantine", "continue", {tag = [...]} or '
        '{route = "pipeline"}'
    )


def _validated(model: type[BaseModel], value: Any) -> BaseModel:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where}: {first['msg']}") from None
