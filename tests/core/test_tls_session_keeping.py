"""S-15: which TLS session a server's shared context offers next (mailpipe/tls.py).

Reading a connection's session costs a copy of it (CPython serialises and parses it,
certificates included), so ``ResumingContext.keep_from`` reads it only when the
session it offered cannot simply be offered again: the connection did not offer the
held session, did not resume it, the server has refused a session it resumed before
(single-use tickets), or the held session is ``KEEP_FOR`` seconds old. These tests drive
it with stand-in connections and a stand-in clock; tests/e2e/test_tls_resumption.py
does it against a real Dovecot.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

import pytest

from mailpipe import tls


class Session:
    """Stands for an ssl.SSLSession that can be resumed."""

    has_ticket = True
    id = b"id"


@dataclass
class Connection:
    """Stands for the SSLObject of one connection: what it offered, whether the server
    resumed it, and its own session (each read counted)."""

    mailpipe_offered: Any
    session_reused: bool
    own: Session = field(default_factory=Session)
    reads: int = 0

    @property
    def session(self) -> Session:
        self.reads += 1
        return self.own


@pytest.fixture
def ctx(monkeypatch: pytest.MonkeyPatch) -> Any:
    clock = [1000.0]
    monkeypatch.setattr(tls.time, "monotonic", lambda: clock[0])
    context = tls.make_ssl_context()
    context.__class__ = tls.ResumingContext
    context.clock = clock  # type: ignore[attr-defined]
    return context


def connect(ctx: Any, *, resumed: bool) -> Connection:
    """One connection offering what the context offers now, ended and handed back."""
    conn = Connection(ctx._session, session_reused=resumed)
    ctx.keep_from(conn)
    return conn


def test_a_session_the_server_resumes_again_and_again_is_read_once(ctx: Any) -> None:
    first = connect(ctx, resumed=False)  # a full handshake: its session is kept
    assert first.reads == 1 and ctx._session is first.own
    later = [connect(ctx, resumed=True) for _ in range(50)]
    assert [c.reads for c in later] == [0] * 50
    assert all(c.mailpipe_offered is first.own for c in later)


def test_a_server_that_refuses_a_session_it_resumed_gets_each_latest(ctx: Any) -> None:
    """RFC 8446 §C.4: a server may take each ticket once. After it refused the held
    session once more, every connection's own session is offered next, as before."""
    first = connect(ctx, resumed=False)
    assert connect(ctx, resumed=True).reads == 0  # the first resumption of it
    refused = connect(ctx, resumed=False)  # the same session, not taken twice
    assert refused.mailpipe_offered is first.own
    assert refused.reads == 1 and ctx._session is refused.own
    for _ in range(5):
        conn = connect(ctx, resumed=True)
        assert conn.reads == 1 and ctx._session is conn.own


def test_a_session_never_resumed_is_replaced_each_time(ctx: Any) -> None:
    """A server that resumes nothing (or whose tickets expired): each connection's
    session is kept, and that is not taken for single use."""
    for _ in range(3):
        conn = connect(ctx, resumed=False)
        assert conn.reads == 1 and ctx._session is conn.own
    assert not ctx._single_use
    assert connect(ctx, resumed=True).reads == 0


def test_the_held_session_is_replaced_after_keep_for(ctx: Any) -> None:
    first = connect(ctx, resumed=False)
    assert connect(ctx, resumed=True).reads == 0
    ctx.clock[0] += ctx.KEEP_FOR - 1
    assert connect(ctx, resumed=True).reads == 0
    ctx.clock[0] += 1
    renewed = connect(ctx, resumed=True)
    assert renewed.reads == 1 and ctx._session is renewed.own is not first.own
    assert connect(ctx, resumed=True).reads == 0  # the new one is kept in turn


def test_a_connection_that_offered_another_session_hands_its_own_back(
    ctx: Any,
) -> None:
    """Connections overlap: one that began before the held session was replaced (or
    before there was any) offered another one, and its own session is kept."""
    held = connect(ctx, resumed=False).own
    early = Connection(None, session_reused=False)
    ctx.keep_from(early)
    assert early.reads == 1 and ctx._session is early.own is not held
    stale = Connection(held, session_reused=True)
    ctx.keep_from(stale)
    assert stale.reads == 1 and ctx._session is stale.own


def test_wrap_bio_records_the_offered_session() -> None:
    """What keep_from compares: the session wrap_bio offered, on the TLS object."""
    tls._CONTEXTS.clear()
    ctx = tls.server_context("mail.example", 995)
    bio = ssl.MemoryBIO
    assert ctx.wrap_bio(bio(), bio(), server_hostname="mail.example").mailpipe_offered is None
    tls._CONTEXTS.clear()
