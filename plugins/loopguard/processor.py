"""The `loopguard` processor: stops automatic answers to mail that must not get one."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Final, Literal

from mailpipe.plugins.parse import parse_into
from mailpipe.plugins.parse.record import MessageRecord
from pydantic import BaseModel, ConfigDict, Field

from mailpipe.processor import Disposition, ProcessorContext, Result
from mailpipe.units import Duration

from .guard import ReplyBudget

if TYPE_CHECKING:
    from mailpipe.message import Message

_NO_REPLY_LOCALS: Final = (
    "mailer-daemon", "postmaster", "noreply", "no-reply", "donotreply", "do-not-reply",
    "bounce", "bounces",
)


class LoopGuardOptions(BaseModel):
    """Options of the `loopguard` processor."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    path: str = Field(
        "var/loopguard.sqlite3",
        description="SQLite file counting answered messages per sender (relative to "
        "the config).",
    )
    max_per_sender: int = Field(
        3, ge=1, strict=True,
        description="Most distinct messages of one sender let through to an "
        "automatic answer within `window` (a message run again counts once).",
    )
    window: Duration = Field(
        86400.0, description="The counting window, e.g. '1h' or '1d'."
    )
    then: Literal["done", "tag"] = Field(
        "done",
        description="When the guard trips: 'done' ends the chain here (the message "
        "counts as processed; later steps such as a forwarder do not run); 'tag' "
        "adds `tag` and continues, for a filter rule to decide.",
    )
    tag: str = Field("no-auto-reply", min_length=1, description="Tag for then = 'tag'.")


def refusal(record: MessageRecord, headers: dict[str, list[str]]) -> str | None:
    """Why no automatic answer may go to this message (RFC 3834 §2), or None."""
    if record.auto_reply:
        return f"auto-generated ({record.auto_reply_reason or 'auto_reply'})"
    if record.bounce is not None:
        return "delivery report"
    if any(v.strip() == "<>" for v in headers.get("return-path", ())):
        return "null return path"
    if record.list_id or "list-post" in headers or "list-unsubscribe" in headers:
        return "mailing list"
    if any(v.strip().lower() in ("bulk", "list", "junk")
           for v in headers.get("precedence", ())):
        return "precedence bulk/list/junk"
    senders = [a.address for a in record.reply_to or record.from_addresses if a.address]
    if not senders:
        return "no sender address"
    if senders[0].partition("@")[0].casefold() in _NO_REPLY_LOCALS:
        return "sender takes no replies"
    return None


class LoopGuardProcessor:
    """Guard an automatic answer (an acknowledgement a forwarder sends back) against
    mail loops: place it just before the step that answers.

    It trips for auto-generated mail (``record.auto_reply``), delivery reports
    (``record.bounce``, when the ``bounce`` step ran before it), a null Return-Path,
    mailing lists, no-reply senders (RFC 3834 §2), and for a sender (Reply-To, else
    From) when ``max_per_sender`` other messages of that sender passed within
    ``window``. Otherwise it counts the message (by its key) for the sender and
    continues. Distinct messages are counted, not runs: a message run again (a later
    step failed temporarily, a crash, a replay) passes without counting again, so a
    retry is never what trips the guard.
    """

    name: ClassVar[str] = "loopguard"
    Options: ClassVar[type[BaseModel]] = LoopGuardOptions
    commits: ClassVar[bool] = False

    def __init__(self, options: LoopGuardOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context
        self._budget: ReplyBudget | None = None

    def open(self) -> None:
        """Open the counting database."""
        if self._budget is None:
            self._budget = ReplyBudget(
                self.context.resolve(self.options.path),
                limit=self.options.max_per_sender,
                window=self.options.window,
            )

    def close(self) -> None:
        """Close the counting database."""
        if self._budget is not None:
            self._budget.close()
            self._budget = None

    def process(self, message: Message) -> Result:
        """Continue, or trip (``then``) when no answer may go to the sender."""
        record = parse_into(message)
        headers: dict[str, list[str]] = {}
        for name, value in record.headers:
            headers.setdefault(name.lower(), []).append(value)
        reason = refusal(record, headers)
        if reason is None and not self.context.dry_run:
            self.open()
            assert self._budget is not None
            sender = next(a.address for a in record.reply_to or record.from_addresses
                          if a.address)
            if not self._budget.take(sender, message.key):
                reason = "sender's answer budget used up"
        if reason is None:
            return None
        message.meta["loopguard"] = reason
        if self.options.then == "tag":
            message.tags.add(self.options.tag)
            return None
        return Disposition.DONE
