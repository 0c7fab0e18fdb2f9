"""The `reply` processor: sets ``record.reply``, the new text of a reply."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from mailpipe.plugins.parse import parse_into
from mailpipe.plugins.parse.record import MessageRecord
from pydantic import BaseModel, ConfigDict, Field

from mailpipe.processor import ProcessorContext, Result

from .html import latest_reply_html
from .rules import latest_reply

if TYPE_CHECKING:
    from mailpipe.message import Message


class ReplyOptions(BaseModel):
    """Options of the `reply` processor."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    body: Literal["auto", "text", "html"] = Field(
        "auto",
        description="Which body to read: 'auto' takes the plain-text body and the "
        "HTML one only when the message has no plain text; 'text' or 'html' insist.",
    )


def reply_of(record: MessageRecord, body: str = "auto") -> str:
    """The latest reply of ``record``'s body (``""`` for an empty body); never raises."""
    html_first = body == "html" or (body == "auto" and record.text_from_html)
    if html_first and record.html:
        return latest_reply_html(record.html)
    if body == "html":
        return ""
    return latest_reply(record.text or "")


class ReplyProcessor:
    """Set ``record.reply`` to the new text of the message: the body without quoted
    history (Gmail/Apple attributions, Outlook header blocks, "Original Message"
    separators, ``>`` quoting, HTML quote containers), ``-- `` signature and mobile
    footers, in English, German, French, Spanish, Portuguese, Japanese and Chinese.

    Parses first when no step did. Never fails and never stops the chain; a message
    that is not a reply gets its whole body (minus signature). See docs/helpdesk.md
    for the measured exact-match accuracy per language.
    """

    name: ClassVar[str] = "reply"
    Options: ClassVar[type[BaseModel]] = ReplyOptions
    commits: ClassVar[bool] = False
    transparent: ClassVar[bool] = True  # never decides; header prefetch skips it
    concurrent: ClassVar[bool] = True

    def __init__(self, options: ReplyOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context

    def process(self, message: Message) -> Result:
        """Set ``record.reply``; always continues."""
        record = parse_into(message)
        record.reply = reply_of(record, self.options.body)
        return None
