"""The `ticket` processor: sets ``record.ticket`` (ticket ids and thread keys)."""

from __future__ import annotations

import re
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

from mailpipe.plugins.parse import parse_into
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailpipe.processor import ProcessorContext, Result

from .keys import DEFAULT_PATTERNS, SubjectRules, ticket_keys

if TYPE_CHECKING:
    from mailpipe.message import Message


class TicketOptions(BaseModel):
    """Options of the `ticket` processor."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PATTERNS),
        description="Regular expressions finding ticket tags in the subject, each "
        "with exactly one group: the ticket id (case-sensitive; (?i) for not). "
        r"Default: '\[#(\d+)\]', '\[Ticket#\s?(\d+)\]', '\[([A-Z][A-Z0-9]{1,9}-\d+)\]'.",
    )
    reply_prefixes: list[str] = Field(
        default_factory=list,
        description="Reply prefixes (without the colon) besides the built-in ones "
        "(Re, AW, SV, VS, Odp, Réf, 返信, 回复, ...).",
    )
    forward_prefixes: list[str] = Field(
        default_factory=list,
        description="Forward prefixes besides the built-in ones (Fwd, FW, WG, TR, "
        "RV, ENC, 転送, 转发, ...).",
    )

    @field_validator("patterns")
    @classmethod
    def _one_group(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                groups = re.compile(pattern).groups
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
            if groups != 1:
                raise ValueError(
                    f"pattern {pattern!r} has {groups} groups; exactly one group "
                    "(the ticket id) is accepted"
                )
        return value

    @field_validator("reply_prefixes", "forward_prefixes")
    @classmethod
    def _words(cls, value: list[str]) -> list[str]:
        for word in value:
            if not word.strip() or word.strip() != word or word.endswith((":", "：")):  # noqa: RUF001
                raise ValueError(
                    f"prefix {word!r}: a word without spaces around it and without "
                    "the colon is accepted (e.g. 'Re')"
                )
        return value


class TicketProcessor:
    """Set ``record.ticket``: ticket ids from subject tags, the Message-IDs this
    message answers (References, In-Reply-To), the thread root, the subject without
    reply/forward prefixes in many languages and without the tags.

    A store or forwarder attaches a reply to its ticket by ``tickets`` first, then by
    any of ``thread_ids`` it knows, then by ``subject``. Never fails; never stops the
    chain. Parses first when no step did.
    """

    name: ClassVar[str] = "ticket"
    Options: ClassVar[type[BaseModel]] = TicketOptions
    commits: ClassVar[bool] = False
    transparent: ClassVar[bool] = True  # never decides; header prefetch skips it
    concurrent: ClassVar[bool] = True

    def __init__(self, options: TicketOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context

    @cached_property
    def rules(self) -> SubjectRules:
        """The compiled subject rules."""
        o = self.options
        return SubjectRules.build(o.patterns, o.reply_prefixes, o.forward_prefixes)

    def process(self, message: Message) -> Result:
        """Set ``record.ticket``; always continues."""
        record = parse_into(message)
        record.ticket = ticket_keys(
            record.subject, record.in_reply_to, record.references, self.rules
        )
        return None
