"""Replaying quarantined messages through their mailbox's pipeline."""

from __future__ import annotations

from mailpipe.chain import Chain
from mailpipe.config import Config
from mailpipe.journal.base import Journal, Status
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
    chain = Chain(
        config.pipelines,
        base_dir=config.base_dir,
        on_complete={n: p.on_complete for n, p in config.model.pipelines.items()},
    )
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
            result = await chain.run(
                pipeline, message, done_steps=entry.steps if entry else ()
            )
            if not result.ok:
                out.append((item, f"failed in {result.failed_step}: {result.error}"))
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
                    journal.finish(
                        item.mailbox,
                        item.uid,
                        status=Status.COMMITTED,
                        disposition="done",
                        sha256=message.sha256,
                        reason="replayed",
                        delete_due=current.delete_due
                        or (
                            current.status == Status.QUARANTINED
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
