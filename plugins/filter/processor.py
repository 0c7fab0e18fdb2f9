"""The `filter` processor: ordered declarative rules deciding drop/keep/quarantine/route."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
from mailpipe.plugins.parse.processor import parse_into
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mailpipe.processor import Decision, Disposition, ProcessorContext, Result

from .conditions import Facts
from .rules import RouteAction, Rule, TagAction

if TYPE_CHECKING:
    from mailpipe.message import Message

log = structlog.get_logger()

_DISPOSITIONS = {
    "drop": Disposition.DONE,
    "keep": Disposition.KEEP,
    "quarantine": Disposition.QUARANTINE,
}


class FilterOptions(BaseModel):
    """Options of the `filter` processor: an ordered list of rules."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    rules: list[Rule] = Field(
        default_factory=list,
        description="Rules in order; the first matching drop/keep/quarantine/route/"
        "continue rule ends the evaluation, tag rules add tags and go on.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_names(cls, data: Any) -> Any:
        """Name unnamed rules "rules[i]" so errors and reasons can point at them."""
        if isinstance(data, dict) and isinstance(data.get("rules"), list):
            rules = []
            for i, rule in enumerate(data["rules"]):
                if isinstance(rule, dict) and not rule.get("name"):
                    rule = {**rule, "name": f"rules[{i}]"}
                rules.append(rule)
            data = {**data, "rules": rules}
        return data


class FilterProcessor:
    """Apply the rules to each message; see docs/filter.md.

    ``process`` evaluates rules in order on the parsed record (``message.record``, or
    a lazy parse), never on the raw bytes: for a message a POP3 server wrapped in a
    notice (RFC 6856 §3) the rules see the original's headers, body and attachments;
    only ``size`` is that of the bytes received. ``prefetch`` decides drop/keep on
    headers alone (``TOP n 0``) when every rule up to the deciding one needs only
    headers, else (and for a server's notice) returns None.
    """

    name: ClassVar[str] = "filter"
    Options: ClassVar[type[BaseModel]] = FilterOptions
    commits: ClassVar[bool] = False
    concurrent: ClassVar[bool] = True  # the rules are read-only: no shared state
    # The rules judge parse's record (its options, e.g. max_body_size, apply): a
    # `parse` step must come earlier in the pipeline (mailpipe.prerequisites).
    requires: ClassVar[tuple[str, ...]] = ("parse",)

    @classmethod
    def requires_for(cls, options: BaseModel) -> list[tuple[str, str]]:
        """(option key path, ``use`` name) for each rule key on a field another step
        sets (``bounce_status`` reads what ``bounce`` sets): that step must come
        earlier too (mailpipe.prerequisites)."""
        assert isinstance(options, FilterOptions)
        return [need for i, rule in enumerate(options.rules)
                for need in rule.when.steps_needed(f"rules[{i}].when")]

    def __init__(self, options: FilterOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context
        self.rules = options.rules
        self._needs_body = [r.needs_body() for r in self.rules]

    @property
    def header_only(self) -> bool:
        """True when every rule needs only headers (and the LIST size)."""
        return not any(self._needs_body)

    def _facts(self, message: Message) -> Facts:
        record = parse_into(message)
        size = message.ref.size if message.headers_only else message.size
        return Facts(record=record, tags=message.tags, size=size, now=datetime.now(UTC))

    def process(self, message: Message) -> Result:
        """Evaluate the rules; tag actions add to ``message.tags``."""
        facts = self._facts(message)
        for rule in self.rules:
            if not rule.when.matches(facts):
                continue
            action = rule.then
            if isinstance(action, TagAction):
                message.tags.update(action.tag)
                log.debug(
                    "filter_tagged", key=message.key, rule=rule.name, tags=action.tag
                )
                continue
            log.info(
                "filter_matched", key=message.key, rule=rule.name, action=_label(action)
            )
            return _decision(rule)
        return None

    def prefetch(self, message: Message) -> Result:
        """Decide drop/keep on a headers-only message; None when it cannot decide.

        None for a POP3 server's notice (``record.server_wrapped``): its header block
        is the server's, so the rules wait for the whole message and judge the
        original it carries.
        """
        facts = self._facts(message)
        if facts.record.server_wrapped:
            return None
        for rule, needs_body in zip(self.rules, self._needs_body, strict=True):
            if needs_body:
                return None  # an earlier body rule might match first
            if not rule.when.matches(facts):
                continue
            action = rule.then
            if isinstance(action, TagAction):
                continue  # tags are applied by process() on the full message
            if isinstance(action, str) and action in ("drop", "keep"):
                log.info(
                    "filter_prefetch_matched",
                    key=message.key,
                    rule=rule.name,
                    action=action,
                )
                return _decision(rule)
            return None  # quarantine and route need the full message; continue: fetch
        return None


def _label(action: object) -> str:
    if isinstance(action, RouteAction):
        return f"route:{action.route}"
    return str(action)


def _decision(rule: Rule) -> Decision | None:
    action = rule.then
    if isinstance(action, RouteAction):
        return Decision(route=action.route, reason=rule.name)
    if isinstance(action, str) and action in _DISPOSITIONS:
        return Decision(disposition=_DISPOSITIONS[action], reason=rule.name)
    return None  # "continue": stop evaluating rules, go on with the chain
