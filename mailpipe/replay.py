"""Replaying quarantined messages through their mailbox's pipeline."""

from __future__ import annotations

from mailpipe.chain import Chain
from mailpipe.config import Config
from mailpipe.journal.base import Journal, Status
from mailpipe.processor import Disposition
from mailpipe.quarantine import Quarantine, QuarantineItem


async def replay(
    config: Config,
    journal: Journal,
    quarantine: Quarantine,
    items: list[QuarantineItem],
) -> list[tuple[QuarantineItem, str]]:
    """Run each item through its mailbox's pipeline; return (item, outcome) pairs.

    Success removes the item from quarantine and records the committed steps; when the
    server copy was kept (entry QUARANTINED, no DELE owed) the entry becomes COMMITTED
    with DELE owed per the mailbox's ``delete`` policy, so the next poll deletes it.
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
                # As in the engine: a non-idempotent side effect (mail sent) is
                # journaled at once, so a later failing step (or replaying again)
                # never repeats it.
                journal.step_committed(item.mailbox, item.uid, step)

            result = await chain.run(
                pipeline,
                message,
                done_steps=entry.steps if entry else (),
                on_commit=journal_now,
            )
            if not result.ok:
                with journal.batch():
                    for step in result.committed:
                        journal.step_committed(item.mailbox, item.uid, step)
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
            with journal.batch():
                if entry is None:
                    journal.begin(
                        item.mailbox, item.uid, key=message.key, size=message.size
                    )
                for step in [*result.committed, *result.pending]:
                    journal.step_committed(item.mailbox, item.uid, step)
                current = journal.get_many(item.mailbox, [item.uid])[item.uid]
                if current.status != Status.DELETED:
                    keep = decided == Disposition.KEEP  # KEEP: leave the server copy
                    journal.finish(
                        item.mailbox,
                        item.uid,
                        status=Status.KEPT if keep else Status.COMMITTED,
                        disposition="keep" if keep else "done",
                        sha256=message.sha256,
                        reason="replayed",
                        delete_due=current.delete_due
                        or (
                            not keep
                            and current.status == Status.QUARANTINED
                            and delete_policy == "after_processing"
                        ),
                    )
            quarantine.drop(item)
            decision = result.decision.disposition if result.decision else "done"
            out.append((item, f"replayed ({decision})"))
    finally:
        await chain.close()
        journal.close()
    return out
