"""The source contract suite: what any source proves before the engine trusts it.

Subclass :class:`SourceContract` in a test module and give it a ``contract_mailbox``
fixture that returns a :class:`ContractMailbox` over an empty mailbox of your source
(a server the test started on 127.0.0.1, a directory, ...)::

    class TestMySourceContract(SourceContract):
        @pytest.fixture
        def contract_mailbox(self, tmp_path):
            return MyMailbox(tmp_path)

pytest then runs every ``test_*`` method below against it. The suite checks the
contract of :mod:`mailpipe.source` as the engine relies on it: the class's
declarations, a listing with stable ids and sizes, retrieval in order and byte-exact
(spooled to disk above the threshold), ``max_size`` honoured, headers, typed session facts, that nothing
is applied before ``commit`` nor after ``abort`` or an exception, each declared
acknowledgement, listing past cursors (a ``CursorSession``), a checkpoint that
applies and keeps the session (a ``CheckpointSession``, MP-06), and a whole poll
through :class:`mailpipe.engine.MailboxRunner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest
from pydantic import BaseModel

from mailpipe.errors import OversizeError
from mailpipe.message import Message, MessageRef
from mailpipe.source import (
    Ack,
    AckKind,
    CheckpointSession,
    CursorSession,
    SessionFacts,
    Source,
    acknowledge,
    acknowledgements_of,
    facts_of,
)

#: Messages every contract test delivers (CRLF line ends, as on the wire).
SAMPLES: tuple[bytes, ...] = (
    b"From: a@example.org\r\nSubject: one\r\nMessage-ID: <1@example.org>\r\n\r\nhello\r\n",
    b"From: b@example.org\r\nSubject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\nend\r\n",
    b"From: c@example.org\r\nSubject: big\r\n\r\n" + (b"0123456789" * 7 + b"\r\n") * 1500,
)


class ContractMailbox(Protocol):
    """A mailbox of the source under test, as the test (the server's side) sees it."""

    def source(self) -> Source:
        """A new source object for this mailbox (as the engine would construct it)."""
        ...

    def deliver(self, data: bytes) -> None:
        """Put a message into the mailbox (the folder the source reads)."""
        ...

    def remaining(self) -> list[bytes]:
        """The messages the source would still list, in delivery order."""
        ...

    def acknowledged(self, ack: Ack) -> list[bytes]:
        """The messages ``ack`` put where it puts them: for ``move`` the target
        folder's, for ``flag`` the flagged ones (``delete``: nothing to return)."""
        ...


async def _listing(box: ContractMailbox) -> list[MessageRef]:
    async with box.source().session() as session:
        return await session.list()


async def _retrieve(session: Any, refs: Sequence[MessageRef], spool: Path,
                    threshold: int = 1 << 20) -> list[Message]:
    out: list[Message] = []
    async for item in session.retrieve(refs, spool_dir=spool, spool_threshold=threshold):
        assert isinstance(item, Message), f"a whole message was not delivered: {item!r}"
        out.append(item)
    return out


class SourceContract:
    """The contract tests; subclass with a ``contract_mailbox`` fixture."""

    def _fill(self, box: ContractMailbox) -> None:
        for data in SAMPLES:
            box.deliver(data)

    def test_declares_name_options_and_acknowledgements(
        self, contract_mailbox: ContractMailbox
    ) -> None:
        source = contract_mailbox.source()
        cls = type(source)
        assert isinstance(source, Source)
        assert isinstance(cls.name, str) and cls.name
        assert issubclass(cls.Options, BaseModel)
        kinds = acknowledgements_of(cls)
        assert kinds and kinds <= set(AckKind)

    async def test_lists_every_message_with_unique_ids_and_sizes(
        self, contract_mailbox: ContractMailbox
    ) -> None:
        self._fill(contract_mailbox)
        async with contract_mailbox.source().session() as session:
            refs = await session.list()
            facts = facts_of(session)
        assert isinstance(facts, SessionFacts)
        assert len(refs) == len(SAMPLES)
        assert [r.number for r in refs] == list(range(1, len(SAMPLES) + 1))
        if facts.stable_ids:
            assert len({r.uid for r in refs}) == len(refs) and all(r.uid for r in refs)
        # A listed size may be counted differently (LF vs CRLF), never zero.
        assert all(r.size > 0 for r in refs)

    async def test_ids_are_stable_across_sessions(
        self, contract_mailbox: ContractMailbox
    ) -> None:
        self._fill(contract_mailbox)
        first = await _listing(contract_mailbox)
        second = await _listing(contract_mailbox)
        async with contract_mailbox.source().session() as session:
            await session.list()
            stable = facts_of(session).stable_ids
        if stable:
            assert [r.uid for r in first] == [r.uid for r in second]

    async def test_retrieves_in_order_byte_exact(
        self, contract_mailbox: ContractMailbox, tmp_path: Path
    ) -> None:
        self._fill(contract_mailbox)
        async with contract_mailbox.source().session() as session:
            refs = await session.list()
            got = await _retrieve(session, refs, tmp_path)
        assert [m.ref.number for m in got] == [r.number for r in refs]
        assert [m.raw for m in got] == list(SAMPLES)

    async def test_large_bodies_are_spooled_to_disk(
        self, contract_mailbox: ContractMailbox, tmp_path: Path
    ) -> None:
        self._fill(contract_mailbox)
        async with contract_mailbox.source().session() as session:
            refs = await session.list()
            got = await _retrieve(session, refs[-1:], tmp_path, threshold=1024)
        (big,) = got
        assert big.spool_path is not None and Path(big.spool_path).parent == tmp_path
        assert big.raw == SAMPLES[-1]
        Path(big.spool_path).unlink()

    async def test_a_message_past_max_size_raises_oversize(
        self, contract_mailbox: ContractMailbox, tmp_path: Path
    ) -> None:
        self._fill(contract_mailbox)
        spool = tmp_path / "contract-spool"
        spool.mkdir()
        async with contract_mailbox.source().session() as session:
            refs = await session.list()
            with pytest.raises(OversizeError) as caught:
                async for _ in session.retrieve(refs[-1:], spool_dir=spool,
                                                spool_threshold=1024, max_size=1000):
                    pass
        assert caught.value.ref is not None and caught.value.ref.number == refs[-1].number
        assert list(spool.iterdir()) == []  # nothing left spooled
        assert contract_mailbox.remaining() == list(SAMPLES)

    async def test_headers_are_the_header_section_or_none(
        self, contract_mailbox: ContractMailbox
    ) -> None:
        self._fill(contract_mailbox)
        async with contract_mailbox.source().session() as session:
            refs = await session.list()
            headers = await session.headers(refs[0])
        if headers is not None:
            assert SAMPLES[0].startswith(headers.rstrip(b"\r\n"))
            assert b"Subject: one" in headers and b"hello" not in headers

    async def test_nothing_applies_without_commit(
        self, contract_mailbox: ContractMailbox, tmp_path: Path
    ) -> None:
        self._fill(contract_mailbox)
        kinds = acknowledgements_of(type(contract_mailbox.source()))
        ack = Ack(AckKind.DELETE) if AckKind.DELETE in kinds else _any_ack(kinds)
        async with contract_mailbox.source().session() as session:
            refs = await session.list()
            await _retrieve(session, refs, tmp_path)
            await acknowledge(session, refs, ack)
            # leaving the block without commit() aborts the session
        assert contract_mailbox.remaining() == list(SAMPLES)

    async def test_an_exception_in_the_session_applies_nothing(
        self, contract_mailbox: ContractMailbox
    ) -> None:
        self._fill(contract_mailbox)
        kinds = acknowledgements_of(type(contract_mailbox.source()))
        ack = _any_ack(kinds)
        with pytest.raises(RuntimeError, match="boom"):
            async with contract_mailbox.source().session() as session:
                refs = await session.list()
                await acknowledge(session, refs, ack)
                raise RuntimeError("boom")
        assert contract_mailbox.remaining() == list(SAMPLES)

    async def test_each_declared_acknowledgement_applies_at_commit(
        self, contract_mailbox: ContractMailbox, tmp_path: Path
    ) -> None:
        kinds = acknowledgements_of(type(contract_mailbox.source()))
        done: list[bytes] = []
        for n, kind in enumerate(sorted(kinds - {AckKind.KEEP})):
            data = SAMPLES[0].replace(b"Subject: one", f"Subject: ack {n}".encode())
            contract_mailbox.deliver(data)
            ack = Ack(kind, _target(kind))
            async with contract_mailbox.source().session() as session:
                refs = await session.list()
                ours = [r for r, m in zip(refs, await _retrieve(session, refs, tmp_path),
                                          strict=True) if m.raw == data]
                assert len(ours) == 1
                await acknowledge(session, ours, ack)
                await session.commit()
            assert data not in contract_mailbox.remaining(), f"{ack} left it listed"
            if kind is not AckKind.DELETE:
                assert data in contract_mailbox.acknowledged(ack), f"{ack} lost it"
            done.append(data)
        assert done or kinds == {AckKind.KEEP}

    async def test_a_cursor_session_lists_only_past_its_cursors(
        self, contract_mailbox: ContractMailbox, tmp_path: Path
    ) -> None:
        """MP-05, for a source whose sessions are a :class:`CursorSession`: resumed
        from cursors over everything listed, a listing shows only mail delivered
        since, and its coverage starts from those cursors."""
        self._fill(contract_mailbox)
        async with contract_mailbox.source().session() as session:
            if not isinstance(session, CursorSession):
                pytest.skip("the source's sessions are no CursorSession")
            session.resume({})
            first = await session.list()
            covered = session.coverage()
        assert sorted(uid for c in covered.values() for uid in c.listed.values()) == sorted(
            r.uid for r in first
        )
        cursors = {scope: max(c.listed, default=c.start) for scope, c in covered.items()}
        fresh = b"From: d@example.org\r\nSubject: later\r\n\r\nnew\r\n"
        contract_mailbox.deliver(fresh)
        async with contract_mailbox.source().session() as session:
            assert isinstance(session, CursorSession)
            session.resume(cursors)
            later = await session.list()
            assert {s: c.start for s, c in session.coverage().items()} == cursors
            got = await _retrieve(session, later, tmp_path)
        assert [m.raw for m in got] == [fresh]

    async def test_a_checkpoint_applies_and_the_session_goes_on(
        self, contract_mailbox: ContractMailbox, tmp_path: Path
    ) -> None:
        """MP-06, for a source whose sessions are a :class:`CheckpointSession`: a
        checkpoint applies what was acknowledged before it, the session lists again
        without it and retrieves the rest, and an abort after the checkpoint applies
        nothing more."""
        self._fill(contract_mailbox)
        kinds = acknowledgements_of(type(contract_mailbox.source()))
        ack = _any_ack(kinds - {AckKind.KEEP})
        async with contract_mailbox.source().session() as session:
            if not isinstance(session, CheckpointSession):
                pytest.skip("the source's sessions are no CheckpointSession")
            refs = await session.list()
            await acknowledge(session, refs[:1], ack)
            await session.checkpoint()
            assert contract_mailbox.remaining() == list(SAMPLES[1:])
            again = await session.list()
            got = await _retrieve(session, again, tmp_path)
            assert [m.raw for m in got] == list(SAMPLES[1:])
            await acknowledge(session, again[:1], ack)
            # leaving the block without commit() aborts the session
        assert contract_mailbox.remaining() == list(SAMPLES[1:])

    async def test_a_whole_poll_through_the_engine(
        self, contract_mailbox: ContractMailbox, tmp_path: Path
    ) -> None:
        from mailpipe.testing.contract_engine import poll_once

        self._fill(contract_mailbox)
        stored = await poll_once(contract_mailbox.source(), tmp_path)
        assert sorted(stored) == sorted(SAMPLES)
        kinds = acknowledgements_of(type(contract_mailbox.source()))
        if AckKind.DELETE in kinds:
            assert contract_mailbox.remaining() == []
        again = await poll_once(contract_mailbox.source(), tmp_path)
        assert again == []  # nothing is processed twice


def _any_ack(kinds: frozenset[AckKind]) -> Ack:
    for kind in (AckKind.DELETE, AckKind.MOVE, AckKind.FLAG):
        if kind in kinds:
            return Ack(kind, _target(kind))
    return Ack(AckKind.KEEP)


def _target(kind: AckKind) -> str | None:
    return {AckKind.MOVE: "Processed", AckKind.FLAG: "$Processed"}.get(kind)
