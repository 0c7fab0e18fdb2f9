"""Replaying quarantined messages through their mailbox's pipeline.

Every journal write and hook goes through :mod:`mailpipe.ledger` (MP-01); nothing
here talks to a server: a replayed message whose server copy is still there is
acknowledged by the mailbox's next poll.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailpipe import ledger
from mailpipe.chain import Chain
from mailpipe.config import Config
from mailpipe.journal.base import Journal
from mailpipe.processor import Disposition
from mailpipe.quarantine import Quarantine, QuarantineItem

if TYPE_CHECKING:
    from mailpipe.plugin_manager import Hooks


async def replay(
    config: Config,
    journal: Journal,
    quarantine: Quarantine,
    items: list[QuarantineItem],
    hooks: Hooks | None = None,
) -> list[tuple[QuarantineItem, str]]:
    """Run each item through its mailbox's pipeline; return (item, outcome) pairs.

    Success removes the item from quarantine and records the committed steps; when the
    server copy was kept (entry QUARANTINED, no acknowledgement owed) the entry becomes
    COMMITTED with its acknowledgement owed per the mailbox's ``delete`` policy, so the
    next poll acknowledges it. ``hooks``, when given, hear ``message_done`` and
    ``message_failed`` like a poll's.
    """
    chain = Chain.from_config(config)
    out: list[tuple[QuarantineItem, str]] = []
    await chain.open()
    try:
        for item in items:
            try:
                spec = config.mailbox(item.mailbox)
                pipeline = spec.config.pipeline
                delete_policy = spec.config.delete
            except KeyError:
                pipeline = next(iter(config.pipelines), "default")
                delete_policy = "never"
            message = quarantine.load(item)
            entry = journal.get_many(item.mailbox, [item.uid]).get(item.uid)

            def journal_now(step: str, item: QuarantineItem = item) -> None:
                # As in a poll: a non-idempotent side effect (mail sent) is journaled
                # at once, so a later failing step (or replaying again) never repeats it.
                ledger.record_step(journal, item.mailbox, item.uid, step)

            result = await chain.run(
                pipeline,
                message,
                done_steps=entry.steps if entry else (),
                on_commit=journal_now,
            )
            if not result.ok:
                ledger.replay_failed(journal, hooks, item.mailbox, item.uid,
                                     message.key, result)
                out.append((item, f"failed in {result.failed_step}: {result.error}"))
                continue
            decided = result.decision.disposition if result.decision else None
            if decided == Disposition.QUARANTINE:
                # The pipeline quarantines it again: the quarantine may hold the only
                # copy, so it stays there (dropping it would lose the message).
                reason = result.decision.reason if result.decision else ""
                out.append((item, f"still quarantined ({reason})"))
                continue
            await chain.flush()
            ledger.replay_done(journal, hooks, message, result, mailbox=item.mailbox,
                               uid=item.uid, delete_policy=delete_policy)
            quarantine.drop(item)
            decision = result.decision.disposition if result.decision else "done"
            out.append((item, f"replayed ({decision})"))
    finally:
        await chain.close()
        journal.close()
    return out
