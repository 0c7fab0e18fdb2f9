"""Header prefetch: decide on a message from its header section before retrieving it.

When a mailbox's chain can decide on headers alone (a filter whose rules read only
headers), each new message's header section is fetched first (POP3 ``TOP n 0``) and
the chain's ``prefetch`` runs on it. A decision (drop, keep) is journaled through the
ledger without the message ever being downloaded; anything else is retrieved whole.

It is an optimisation and never a risk: once a server refuses a header request, cuts
its reply short, or serves a short copy after one (issue 20 item 3), prefetch is off
for good for that mailbox, and a message whose earlier retrieval came back short is
retrieved whole without asking for headers first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mailpipe.message import Message, MessageRef
from mailpipe.processor import Disposition

if TYPE_CHECKING:
    from mailpipe.chain import Chain
    from mailpipe.config import MailboxConfig
    from mailpipe.journal.base import Journal
    from mailpipe.ledger import Ledger


class HeaderPrefetch:
    """Prefetch for one mailbox (for the runner's life: ``off`` stays off)."""

    def __init__(self, cfg: MailboxConfig, chain: Chain, log: Any) -> None:
        self.cfg = cfg
        self.chain = chain
        self.log = log
        self.off = False

    def wanted(self) -> bool:
        """True when the mailbox asks for it, the chain can use it and it is not off."""
        return (
            self.cfg.header_prefetch
            and not self.off
            and self.chain.can_prefetch(self.cfg.pipeline)
        )

    def disable(self, why: str) -> None:
        """Stop asking this server for headers, once, with the reason logged."""
        if not self.off:
            self.off = True
            self.log.warning("header_prefetch_disabled", reason=why)

    async def decide(
        self,
        session: Any,
        refs: list[MessageRef],
        *,
        journal: Journal,
        ledger: Ledger,
        attempted: set[str],
        stop: asyncio.Event,
        mark: Callable[[str | None], None],
    ) -> list[MessageRef]:
        """Run header rules on ``refs``; return those that still need retrieval.

        ``mark`` sets the in-flight marker around the chain's prefetch, so a header
        rule that kills the process is charged an attempt like any chain.
        """
        from mailpipe.planning import UNRETRIEVABLE

        todo: list[MessageRef] = []
        entries = journal.get_many(ledger.mailbox, [r.uid for r in refs if r.uid])
        for ref in refs:
            if stop.is_set():
                break
            spent = entries.get(ref.uid)
            if spent is not None and spent.attempts >= self.cfg.max_attempts:
                todo.append(ref)  # retrieved to be quarantined (the engine's _run_one)
                continue
            if self.off or (
                spent is not None and spent.last_error.startswith(UNRETRIEVABLE)
            ):
                todo.append(ref)  # a retry of a short retrieval: no headers before it
                continue
            headers = await session.headers(ref)
            if headers is None:
                # Refused, or cut short: decide on the whole message instead, and
                # stop asking this server for headers (issue 20 item 3).
                self.disable("the server refused TOP or cut its reply")
                todo.append(ref)
                continue
            msg = Message(ref=ref, data=headers, headers_only=True)
            mark(ref.uid)
            try:
                decision = await self.chain.prefetch(self.cfg.pipeline, msg)
            finally:
                mark(None)
            if decision is None or decision.disposition == Disposition.QUARANTINE:
                todo.append(ref)
                continue
            attempted.add(ref.uid)  # decided in this poll: never run again in it
            ledger.decided(ref, decision, None)
            self.log.info("message_decided_on_headers", uid=ref.uid,
                          disposition=str(decision.disposition), reason=decision.reason)
        return todo
