"""Sans-I/O POP3 protocol: bytes ⇄ events, every vector fed whole, byte by byte, at random
split points and with trailing data (conformance C-06). No event loop, no socket."""

from __future__ import annotations

import ast
import itertools
import random
from pathlib import Path

import pytest
from mailpipe.plugins.pop3 import protocol as protocol_module
from mailpipe.plugins.pop3.events import (
    Apop,
    Auth,
    AuthResponse,
    BodyChunk,
    BodyEnd,
    BodyStart,
    Capa,
    ConnectionClosed,
    Continuation,
    Dele,
    Err,
    Greeting,
    List,
    MultiLine,
    Noop,
    Ok,
    Pass,
    Quit,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
    parse_capa,
    parse_list,
    parse_uidl,
)
from mailpipe.plugins.pop3.protocol import (
    NEED_DATA,
    LocalProtocolError,
    Pop3Connection,
    Pop3ProtocolError,
    RemoteProtocolError,
    State,
)

from mailpipe.errors import SourceError

# --- helpers ---------------------------------------------------------------------------


def greeted(greeting: bytes = b"+OK ready\r\n", **kw: int) -> Pop3Connection:
    conn = Pop3Connection(**kw)
    conn.receive_data(greeting)
    assert isinstance(conn.next_event(), Greeting)
    return conn


def authed(
    pipelining: bool = False, newline: bytes = b"\r\n", **kw: int
) -> Pop3Connection:
    """An authenticated connection; ``newline`` b"\\n": the server's greeting and
    replies end in a bare LF (T-08)."""
    conn = greeted(b"+OK ready" + newline, **kw)
    conn.send(User(name="bob"))
    conn.receive_data(b"+OK" + newline)
    conn.next_event()
    conn.send(Pass(password="pw"))
    conn.receive_data(b"+OK" + newline)
    conn.next_event()
    assert conn.state is State.TRANSACTION and conn.newline == newline
    conn.pipelining = pipelining
    return conn


def drain(conn: Pop3Connection) -> list[object]:
    """Every event until NEED_DATA, with adjacent body chunks merged."""
    out: list[object] = []
    for _ in range(1_000_000):
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        if isinstance(ev, ConnectionClosed):
            out.append(ev)
            return out
        if isinstance(ev, BodyChunk) and out and isinstance(out[-1], BodyChunk):
            out[-1] = BodyChunk(out[-1].data + ev.data)
        else:
            out.append(ev)
    raise AssertionError("event loop did not terminate")


def feed(conn: Pop3Connection, pieces: list[bytes]) -> list[object]:
    events: list[object] = []
    for piece in pieces:
        conn.receive_data(piece)
        for ev in drain(conn):
            if isinstance(ev, BodyChunk) and events and isinstance(events[-1], BodyChunk):
                events[-1] = BodyChunk(events[-1].data + ev.data)
            else:
                events.append(ev)
    return events


def splits(data: bytes) -> dict[str, list[bytes]]:
    """C-06: whole, one byte at a time, and random split points (fixed seeds)."""
    modes = {"whole": [data], "bytewise": [data[i : i + 1] for i in range(len(data))]}
    for seed in (1, 2, 3):
        rnd = random.Random(seed)
        cuts = sorted(rnd.sample(range(1, len(data)), min(5, len(data) - 1)))
        bounds = [0, *cuts, len(data)]
        modes[f"random{seed}"] = [data[a:b] for a, b in itertools.pairwise(bounds)]
    return modes


def run_all_ways(make, commands, data: bytes, trailing: bytes = b"+OK trailing\r\n"):
    """Feed ``data`` every way; each must give the same events. Then with trailing data,
    which must stay buffered (not consumed by the reply)."""
    results = []
    for name, pieces in splits(data).items():
        conn = make()
        for c in commands:
            conn.send(c)
        events = feed(conn, pieces)
        results.append((name, events))
    first = results[0][1]
    for name, events in results:
        assert events == first, name
    conn = make()
    for c in commands:
        conn.send(c)
    conn.receive_data(data + trailing)
    assert drain_until_idle(conn) == first
    assert conn.buffered == len(trailing)
    return first


def drain_until_idle(conn: Pop3Connection) -> list[object]:
    out: list[object] = []
    while conn.outstanding:
        ev = conn.next_event()
        assert ev is not NEED_DATA
        if isinstance(ev, BodyChunk) and out and isinstance(out[-1], BodyChunk):
            out[-1] = BodyChunk(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def body_of(events: list[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, BodyChunk))


# --- the module does no I/O -------------------------------------------------------------


def test_protocol_and_events_import_no_io_modules():
    forbidden = {"socket", "asyncio", "ssl", "selectors"}
    for mod in ("protocol.py", "events.py", "auth.py"):
        tree = ast.parse((Path(protocol_module.__file__).parent / mod).read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        assert not names & forbidden, (mod, names & forbidden)


def test_protocol_error_is_abstract_and_split_by_blame():
    with pytest.raises(TypeError):
        Pop3ProtocolError("x")
    assert issubclass(LocalProtocolError, Pop3ProtocolError)
    assert issubclass(RemoteProtocolError, Pop3ProtocolError)
    assert issubclass(Pop3ProtocolError, SourceError)


# --- C-01 / C-02 / C-18: commands on the wire -----------------------------------------

COMMAND_BYTES = [
    (User(name="alice"), b"USER alice\r\n"),
    (Pass(password="a b c"), b"PASS a b c\r\n"),
    (Apop(name="mrose", digest="c4c9334bac560ecc979e58001b3e22fb"),
     b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n"),
    (Auth(mechanism="PLAIN", initial_response="AHVzZXIAcGFzcw=="),
     b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n"),
    (Auth(mechanism="EXTERNAL", initial_response=""), b"AUTH EXTERNAL =\r\n"),
    (Auth(mechanism="XOAUTH2"), b"AUTH XOAUTH2\r\n"),
    (Capa(), b"CAPA\r\n"),
    (Stls(), b"STLS\r\n"),
    (Stat(), b"STAT\r\n"),
    (List(), b"LIST\r\n"),
    (List(number=3), b"LIST 3\r\n"),
    (Uidl(), b"UIDL\r\n"),
    (Uidl(number=2), b"UIDL 2\r\n"),
    (Retr(number=7), b"RETR 7\r\n"),
    (Top(number=1, lines=0), b"TOP 1 0\r\n"),
    (Dele(number=1), b"DELE 1\r\n"),
    (Noop(), b"NOOP\r\n"),
    (Rset(), b"RSET\r\n"),
    (Quit(), b"QUIT\r\n"),
]


@pytest.mark.parametrize(("command", "wire"), COMMAND_BYTES, ids=lambda v: repr(v)[:30])
def test_command_wire_bytes(command, wire):
    assert command.to_bytes() == wire


@pytest.mark.parametrize(
    "build",
    [
        lambda: User(name="a\r\nDELE 1"),
        lambda: User(name="a\nb"),
        lambda: User(name="a\x00b"),
        lambda: Pass(password="pw\r\nDELE 1"),
        lambda: Pass(password="p\x00"),
        lambda: Apop(name="a", digest="d\r"),
        lambda: Auth(mechanism="PLAIN\r\nDELE"),
        lambda: Auth(mechanism="PLAIN", initial_response="AA\nBB"),
        lambda: AuthResponse(data="x\r\nDELE 1"),
        lambda: Retr(number=-1),
        lambda: Top(number=1, lines=-1),  # C-52: n must be non-negative
    ],
    ids=["user-crlf", "user-lf", "user-nul", "pass-crlf", "pass-nul", "apop-cr",
         "mech-crlf", "ir-lf", "sasl-crlf", "negative-number", "top-negative-lines"],
)
def test_c02_injection_refused_before_anything_is_sent(build):
    with pytest.raises(ValueError):
        build()


def test_c01_command_over_255_octets_refused():
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="255"):
        conn.send(User(name="u" * 300))
    assert conn.state is State.ERROR


def test_sensitive_reprs_mask_secrets():
    for cmd, secret in [
        (Pass(password="hunter22"), "hunter22"),
        (Apop(name="bob", digest="c4c9334bac560ecc979e58001b3e22fb"), "c4c9334b"),
        (Auth(mechanism="PLAIN", initial_response="AHVzZXIAcGFzcw=="), "AHVzZXIA"),
        (AuthResponse(data="c2VjcmV0"), "c2VjcmV0"),
    ]:
        assert secret not in repr(cmd) and secret not in cmd.describe()


# --- C-03 / C-14 / C-15 / T-17 / T-18: greetings --------------------------------------

GREETINGS = [
    (b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n",
     Greeting(text="POP3 server ready <1896.697170952@dbc.mtview.ca.us>",
              apop_timestamp=b"<1896.697170952@dbc.mtview.ca.us>")),
    (b"+OK Gpop ready for requests from 124.168.132.215 q5pf21484907pbh.7\r\n",
     Greeting(text="Gpop ready for requests from 124.168.132.215 q5pf21484907pbh.7")),
    (b"+OK <>\r\n", Greeting(text="<>")),
    (b"+OK hi <a b@c>\r\n", Greeting(text="hi <a b@c>")),
    (b"+OK <nodomain>\r\n", Greeting(text="<nodomain>")),
    (b"+OK <server.x> ready <1.2@host>\r\n", Greeting(text="<server.x> ready <1.2@host>")),
    (b"+OK Dovecot ready.\r\n", Greeting(text="Dovecot ready.")),
    (b"+OK [XCLIENT] Dovecot ready.\r\n", Greeting(text="[XCLIENT] Dovecot ready.", code="XCLIENT")),
    (b"+OK\r\n", Greeting(text="")),
]


@pytest.mark.parametrize(("data", "expected"), GREETINGS, ids=lambda v: str(v)[:40])
def test_greeting_parsed_every_way(data, expected):
    for name, pieces in splits(data).items():
        conn = Pop3Connection()
        events = feed(conn, pieces)
        assert events == [expected], name
        assert conn.state is State.AUTHORIZATION


def test_c14_err_greeting_closes_with_code():
    conn = Pop3Connection()
    events = feed(conn, [b"-ERR [SYS/TEMP] Too many connections\r\n", b""])
    assert events[0] == Err(command=None, text="[SYS/TEMP] Too many connections", code="SYS/TEMP")
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(
    ("data", "hint"),
    [(b"* OK [CAPABILITY IMAP4rev1] ready\r\n", "IMAP"),
     (b"220 mx ESMTP\r\n", "SMTP"),
     (b"\x16\x03\x01\x00\x05hello\r\n", "TLS")],
    ids=["imap", "smtp", "tls"],
)
def test_c03_wrong_protocol_named(data, hint):
    conn = Pop3Connection()
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=hint):
        conn.next_event()
    assert conn.state is State.ERROR


def test_t08_bare_lf_greeting_switches_session_to_lf_framing():
    conn = Pop3Connection()
    conn.receive_data(b"+OK pop3 ready\n")
    assert isinstance(conn.next_event(), Greeting)
    assert any("bare LF" in w for w in conn.warnings)
    conn.send(User(name="u"))
    conn.receive_data(b"+OK\n")
    conn.next_event()
    conn.send(Pass(password="p"))
    conn.receive_data(b"+OK\n")
    conn.next_event()
    conn.send(Retr(number=1))
    events = feed(conn, [b"+OK\nx\n..y\n.\n"])
    assert body_of(events) == b"x\n.y\n"
    assert isinstance(events[-1], BodyEnd)


@pytest.mark.parametrize(
    ("greeting", "newline", "warned"),
    [(b"+OK pop3 ready\n", b"\n", True), (b"+OK pop3 ready\r\n", b"\r\n", False),
     (b"+OK <1.2@h> x\n", b"\n", True)],
    ids=["bare-lf", "crlf", "bare-lf-apop"],
)
def test_t08_greeting_decides_the_session_framing_every_way(greeting, newline, warned):
    for name, pieces in splits(greeting).items():
        conn = Pop3Connection()
        events = feed(conn, pieces)
        assert [type(e) for e in events] == [Greeting], name
        assert conn.newline == newline, name
        assert any("bare LF" in w for w in conn.warnings) is warned, name


T08_BODIES = [
    ("t08", b"+OK\nx\n.\n", b"x\n"),
    ("t08-empty", b"+OK\n.\n", b""),
    ("t08-stuffed", b"+OK 9 octets\nx\n..y\n...\n..\n.\n", b"x\n.y\n..\n.\n"),
    ("t08-cr-is-data", b"+OK\na\r\nb\r.\r\n.\n", b"a\r\nb\r.\r\n"),
    ("t08-dot-cr", b"+OK\n.\r\nz\n.\n", b"\r\nz\n"),  # stuffed dot removed
    ("t08-long-line", b"+OK\n" + b"y" * 10_000 + b"\n.\n", b"y" * 10_000 + b"\n"),
    ("t08-status-crlf", b"+OK\r\nx\n.\n", b"x\n"),  # status lines: optional CR
]


@pytest.mark.parametrize(("name", "data", "body"), T08_BODIES, ids=[b[0] for b in T08_BODIES])
def test_t08_lf_session_body_every_way(name, data, body):
    events = run_all_ways(lambda: authed(newline=b"\n"), [Retr(number=1)], data, trailing=b"+OK trailing\n")
    assert isinstance(events[0], BodyStart)
    assert body_of(events) == body
    assert events[-1] == BodyEnd(command=Retr(number=1), octets=len(body))


def test_t08_lf_session_listings_every_way():
    data = b"+OK\n1 abc\n2 def\n.\n+OK 2 messages\n1 5\n2 6 \n.\n+OK\nA\n..B\n.\n+OK\n"
    cmds = [Uidl(), List(), Retr(number=1), Dele(number=1)]
    events = run_all_ways(lambda: authed(pipelining=True, newline=b"\n"), cmds, data,
                          trailing=b"+OK trailing\n")
    uidl, listing = events[0], events[1]
    assert uidl == MultiLine(command=Uidl(), text="", body=b"1 abc\n2 def\n", newline=b"\n")
    assert parse_uidl(uidl.body, uidl.newline) == [(1, "abc"), (2, "def")]
    assert parse_list(listing.body, listing.newline) == [(1, 5), (2, 6)]
    assert body_of(events) == b"A\n.B\n"
    assert events[-1] == Ok(command=Dele(number=1), text="")


def test_t08_lf_session_capa():
    conn = greeted(b"+OK ready\n")
    conn.send(Capa())
    events = feed(conn, [b"+OK\nTOP\nSASL PLAIN\nPIPELINING\n.\n"])
    caps = parse_capa(events[0].body)
    assert {"TOP", "SASL", "PIPELINING"} <= caps.names and caps.sasl == ("PLAIN",)


def test_t08_crlf_session_keeps_strict_framing():
    # A CRLF greeting never switches: later bare-LF lines stay data (§0.2, T-05).
    conn = authed()
    conn.send(Retr(number=1))
    events = feed(conn, [b"+OK\nx\n.\n"])
    assert conn.newline == b"\r\n" and body_of(events) == b"x\n.\n"
    assert conn.outstanding == 1 and not any("bare LF" in w for w in conn.warnings)
    conn.receive_data(b"\r\n.\r\n")
    events += drain(conn)
    assert body_of(events) == b"x\n.\n\r\n"
    assert events[-1] == BodyEnd(command=Retr(number=1), octets=6)


# --- C-03 / C-48 / C-09: single-line replies -----------------------------------------

SINGLE = [
    (Stat(), b"+OK 2 320\r\n", Ok(command=Stat(), text="2 320")),
    (Noop(), b"+OK\r\n", Ok(command=Noop(), text="")),
    (Stat(), b"-ERR\r\n", Err(command=Stat(), text="")),
    (List(number=1), b"+OK 1 120\r\n", Ok(command=List(number=1), text="1 120")),
    (List(number=3), b"-ERR no such message, only 2 messages in maildrop\r\n",
     Err(command=List(number=3), text="no such message, only 2 messages in maildrop")),
    (Uidl(number=2), b"+OK 2 QhdPYR:00WBw1Ph7x7\r\n",
     Ok(command=Uidl(number=2), text="2 QhdPYR:00WBw1Ph7x7")),
    (Dele(number=1), b"+OK message 1 deleted\r\n", Ok(command=Dele(number=1), text="message 1 deleted")),
    (Retr(number=1), b"-ERR [SYS/TEMP/FOO] busy\r\n",
     Err(command=Retr(number=1), text="[SYS/TEMP/FOO] busy", code="SYS/TEMP/FOO")),
    (Rset(), b"+OK maildrop has 2 messages (320 octets)\r\n",
     Ok(command=Rset(), text="maildrop has 2 messages (320 octets)")),
]


@pytest.mark.parametrize(("command", "data", "expected"), SINGLE, ids=lambda v: str(v)[:30])
def test_single_line_replies(command, data, expected):
    events = run_all_ways(authed, [command], data)
    assert events == [expected]


def test_c03_nonstandard_plus_is_ok_with_warning():
    conn = authed()
    conn.send(Noop())
    conn.receive_data(b"+OKAY\r\n")
    assert isinstance(conn.next_event(), Ok)
    assert conn.warnings


def test_c04_long_status_line_accepted_up_to_cap():
    conn = authed()
    conn.send(Noop())
    conn.receive_data(b"+OK " + b"x" * 4000 + b"\r\n")
    ev = conn.next_event()
    assert isinstance(ev, Ok) and len(ev.text) == 4000
    assert any("512" in w for w in conn.warnings)


def test_c04_status_line_without_crlf_fails_after_cap_bounded():
    conn = authed()
    conn.send(Noop())
    conn.receive_data(b"+OK " + b"x" * 9000)
    with pytest.raises(RemoteProtocolError, match="too long"):
        conn.next_event()
    assert conn.state is State.ERROR


# --- C-07 / C-08 / C-10 / T-01..T-15: multi-line framing ------------------------------

BODIES = [
    ("c07-stuffed", b"+OK\r\n..foo\r\n.\r\n", b".foo\r\n"),
    ("c07-triple", b"+OK\r\n...\r\n.\r\n", b"..\r\n"),
    ("c07-empty", b"+OK\r\n.\r\n", b""),
    ("c07-lone-dot", b"+OK\r\n..\r\n.\r\n", b".\r\n"),
    ("c08-bare-lf-dot", b"+OK\r\na\n.\nb\r\n.\r\n", b"a\n.\nb\r\n"),
    ("c08-bare-cr-dot", b"+OK\r\na\r.\rb\r\n.\r\n", b"a\r.\rb\r\n"),
    ("c08-lf-then-dotcrlf", b"+OK\r\nx\n.\r\ny\r\n.\r\n", b"x\n.\r\ny\r\n"),
    ("c10-octets", b"+OK\r\n\x00\xff\xfe\r\n.\r\n", b"\x00\xff\xfe\r\n"),
    # C-05: "120 octets" is informational; BodyEnd.octets counts what arrived.
    ("c51-retr", b"+OK 120 octets\r\nSubject: a\r\n\r\n..hidden\r\n.\r\n",
     b"Subject: a\r\n\r\n.hidden\r\n"),
    ("t01", b"+OK\r\n..a\r\n..\r\n...\r\n.\r\n", b".a\r\n.\r\n..\r\n"),
    # T-02: a stuffed lone-dot line inside the body.
    ("t02", b"+OK\r\nx\r\n..\r\ny\r\n.\r\n", b"x\r\n.\r\ny\r\n"),
    ("t03-unstuffed-dot-lost", b"+OK\r\n.hidden\r\nz\r\n.\r\n", b"hidden\r\nz\r\n"),
    ("t05-bare-lf-lines", b"+OK\r\nl1\nl2\n.\nl3\r\n.\r\n", b"l1\nl2\n.\nl3\r\n"),
    # T-06, T-07: bare CR is data; "." + bare LF loses only the dot (RFC 1939 §3).
    ("t06-cr-without-lf", b"+OK\r\na\rb\r.\r\n.\r\n", b"a\rb\r.\r\n"),
    ("t07-dot-bare-lf", b"+OK\r\nq\r\n.\nr\r\n.\r\n", b"q\r\n\nr\r\n"),
    # T-11: store what was received (Dovecot appended the CRLF server-side).
    ("t11", b"+OK\r\nabc\r\n.\r\n", b"abc\r\n"),
    # T-12: no per-line limit (the 10 MiB line: test_c11_ten_mib_single_line_streamed_in_chunks).
    ("t12-long-line", b"+OK\r\n" + b"x" * 10_000 + b"\r\n.\r\n", b"x" * 10_000 + b"\r\n"),
    # T-13, T-14: NUL and 8-bit bytes preserved byte-exact.
    ("t13-nul", b"+OK\r\nA\x00B\r\n\x00\r\n.\r\n", b"A\x00B\r\n\x00\r\n"),
    ("t14-8bit", b"+OK\r\nSubject: \xe2\x82\xac\xff\r\n\r\n.\r\n",
     b"Subject: \xe2\x82\xac\xff\r\n\r\n"),
    ("dot-cr-x", b"+OK\r\n.\rx\r\n.\r\n", b"\rx\r\n"),
    ("crcr", b"+OK\r\na\r\r\n.\r\n", b"a\r\r\n"),
]


@pytest.mark.parametrize(("name", "data", "body"), BODIES, ids=[b[0] for b in BODIES])
def test_retr_body_is_dot_unstuffed_every_way(name, data, body):
    events = run_all_ways(authed, [Retr(number=1)], data)
    assert isinstance(events[0], BodyStart)
    assert body_of(events) == body
    assert events[-1] == BodyEnd(command=Retr(number=1), octets=len(body))


@pytest.mark.parametrize(("name", "data", "body"), BODIES[:8], ids=[b[0] for b in BODIES[:8]])
def test_top_body_same_framing(name, data, body):
    # C-52: TOP replies are framed exactly like RETR.
    events = run_all_ways(authed, [Top(number=1, lines=0)], data)
    assert body_of(events) == body


def test_t04_terminator_split_across_reads():
    conn = authed()
    conn.send(Retr(number=1))
    events = feed(conn, [b"+OK\r\nabc\r", b"\n.", b"\r"])
    assert conn.outstanding == 1 and body_of(events) == b"abc\r\n"
    conn.receive_data(b"\n+OK\r\n")
    assert conn.next_event() == BodyEnd(command=Retr(number=1), octets=5)
    assert conn.outstanding == 0 and conn.buffered == len(b"+OK\r\n")


def test_c11_ten_mib_single_line_streamed_in_chunks():
    conn = authed()
    conn.send(Retr(number=1))
    line = b"A" * 10_485_760
    conn.receive_data(b"+OK\r\n")
    assert isinstance(conn.next_event(), BodyStart)
    total, biggest = 0, 0
    for off in range(0, len(line), 65536):
        conn.receive_data(line[off : off + 65536])
        for ev in drain(conn):
            total += len(ev.data)
            biggest = max(biggest, len(ev.data))
        assert conn.buffered <= 2  # memory bounded by the chunk fed, not the line
    conn.receive_data(b"\r\n.\r\n")
    events = drain(conn)
    total += sum(len(e.data) for e in events if isinstance(e, BodyChunk))
    assert total == 10_485_762
    assert biggest <= 65536
    assert events[-1] == BodyEnd(command=Retr(number=1), octets=10_485_762)


def test_c11_total_size_cap():
    conn = authed(max_message=100)
    conn.send(Retr(number=1))
    conn.receive_data(b"+OK\r\n" + b"x" * 200 + b"\r\n.\r\n")
    conn.next_event()
    with pytest.raises(RemoteProtocolError, match="cap"):
        conn.next_event()
    assert conn.state is State.ERROR


@pytest.mark.parametrize(
    "data",
    [b"+OK 500 octets\r\nSubject: x\r\n\r\npartial", b"+OK\r\nFrom: x\r\n\r\nhalf",
     b"+OK\r\nx\r\n.\r", b"+OK\r\nx\r\n.", b"+OK\r\n", b"+OK"],
    ids=["c12", "t28", "t09-dot-cr", "dot", "status-only", "partial-status"],
)
def test_c12_eof_before_terminator_is_truncation(data):
    # S-07: a TLS EOF mid-response reaches the parser as this same EOF: a failed transfer.
    conn = authed()
    conn.send(Retr(number=1))
    conn.receive_data(data)
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        for _ in range(10):
            conn.next_event()
    assert info.value.truncated


def test_t10_dot_glued_to_last_line_is_data_every_way():
    # fetchmail FAQ S2 (Exchange 2000): no terminator, so the body never ends.
    for name, pieces in splits(b"+OK\r\nlast line.\r\n").items():
        conn = authed()
        conn.send(Retr(number=1))
        events = feed(conn, pieces)
        assert [type(e) for e in events] == [BodyStart, BodyChunk], name
        assert body_of(events) == b"last line.\r\n" and conn.outstanding == 1, name
        conn.receive_data(b"")  # the driver's timeout ends it; an EOF is truncation
        with pytest.raises(RemoteProtocolError) as info:
            conn.next_event()
        assert info.value.truncated, name


def test_eof_with_nothing_outstanding_is_connection_closed():
    conn = authed()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.state is State.CLOSED


# --- C-09 / T-15 / P-02: pipelined replies --------------------------------------------


def test_c09_pipelined_err_then_ok():
    events = run_all_ways(
        lambda: authed(pipelining=True),
        [Retr(number=1), Retr(number=2)],
        b"-ERR no such message\r\n+OK\r\nx\r\n.\r\n",
    )
    assert events == [
        Err(command=Retr(number=1), text="no such message"),
        BodyStart(command=Retr(number=2), text=""),
        BodyChunk(b"x\r\n"),
        BodyEnd(command=Retr(number=2), octets=3),
    ]


def test_t15_status_glued_to_data_goes_to_next_command():
    events = run_all_ways(
        lambda: authed(pipelining=True),
        [Retr(number=1), Dele(number=1)],
        b"+OK 120 octets\r\nFrom: a\r\n.\r\n+OK\r\n",
    )
    assert body_of(events) == b"From: a\r\n"
    assert events[-1] == Ok(command=Dele(number=1), text="")


def test_t30_uidl_list_and_retr_window_in_one_flight():
    data = (
        b"+OK\r\n1 abc\r\n2 def\r\n.\r\n"
        b"+OK 2 messages\r\n1 5\r\n2 6\r\n.\r\n"
        b"+OK\r\nhello\r\n.\r\n+OK\r\n..world\r\n.\r\n+OK\r\n+OK\r\n"
    )
    cmds = [Uidl(), List(), Retr(number=1), Retr(number=2), Dele(number=1), Dele(number=2)]
    events = run_all_ways(lambda: authed(pipelining=True), cmds, data)
    assert events[0] == MultiLine(command=Uidl(), text="", body=b"1 abc\r\n2 def\r\n")
    assert events[1] == MultiLine(command=List(), text="2 messages", body=b"1 5\r\n2 6\r\n")
    assert [type(e).__name__ for e in events[2:]] == [
        "BodyStart", "BodyChunk", "BodyEnd", "BodyStart", "BodyChunk", "BodyEnd", "Ok", "Ok"]
    assert events[3].data == b"hello\r\n" and events[6].data == b".world\r\n"


def test_p02_desync_line_is_remote_error():
    conn = authed(pipelining=True)
    conn.send(Stat())
    conn.receive_data(b"garbage\r\n")
    with pytest.raises(RemoteProtocolError, match="expected"):
        conn.next_event()


def test_c59_unsolicited_line_marks_connection_dead():
    # T-39: Dovecot's idle autologout notice.
    conn = authed()
    conn.receive_data(b"-ERR Disconnected for inactivity.\r\n")
    with pytest.raises(RemoteProtocolError, match="unsolicited"):
        conn.next_event()
    assert conn.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())


def test_t03_unstuffed_lone_dot_leaves_unsolicited_rest():
    conn = authed()
    conn.send(Retr(number=1))
    conn.receive_data(b"+OK\r\na\r\n.\r\nb\r\n.\r\n")
    events = drain_until_idle(conn)
    assert body_of(events) == b"a\r\n"
    with pytest.raises(RemoteProtocolError, match="unsolicited"):
        conn.next_event()


def test_p03_lockstep_without_pipelining():
    # P-11: without PIPELINING, one command outstanding.
    conn = authed(pipelining=False)
    conn.send(Retr(number=1))
    with pytest.raises(LocalProtocolError, match="outstanding"):
        conn.send(Retr(number=2))


@pytest.mark.parametrize("cmd", [Quit(), Stls(), User(name="x")], ids=["quit", "stls", "user"])
def test_p03_never_pipelined(cmd):
    conn = authed(pipelining=True)
    conn.send(Retr(number=1))
    with pytest.raises(LocalProtocolError):
        conn.send(cmd)


# --- state table ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "cmd"),
    [
        (greeted, Retr(number=1)),
        (greeted, Stat()),
        (greeted, Dele(number=1)),
        (greeted, Noop()),
        (authed, User(name="a")),
        (authed, Stls()),
        (authed, Auth(mechanism="PLAIN")),  # C-41: no AUTH after a successful login
        (Pop3Connection, User(name="a")),
    ],
    ids=["retr-auth", "stat-auth", "dele-auth", "noop-auth", "user-trans", "stls-trans",
         "auth-trans", "before-greeting"],
)
def test_command_outside_its_state_is_local_error(make, cmd):
    conn = make()
    with pytest.raises(LocalProtocolError):
        conn.send(cmd)
    assert conn.state is State.ERROR


def test_c17_pass_only_after_user_ok():
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="USER"):
        conn.send(Pass(password="x"))
    conn = greeted()
    conn.send(User(name="frated"))
    conn.receive_data(b"-ERR sorry, no mailbox for frated here\r\n")
    assert isinstance(conn.next_event(), Err)
    with pytest.raises(LocalProtocolError):
        conn.send(Pass(password="x"))


def test_c19_failed_auth_stays_in_authorization():
    conn = greeted()
    conn.send(User(name="u"))
    conn.receive_data(b"+OK\r\n")
    conn.next_event()
    conn.send(Pass(password="bad"))
    conn.receive_data(b"-ERR [AUTH] Authentication failed.\r\n")
    ev = conn.next_event()
    assert ev == Err(command=Pass(password="bad"), text="[AUTH] Authentication failed.", code="AUTH")
    assert conn.state is State.AUTHORIZATION


def test_c20_quit_in_authorization_closes():
    conn = greeted()
    conn.send(Quit())
    conn.receive_data(b"+OK dewey POP3 server signing off\r\n")
    assert isinstance(conn.next_event(), Ok)
    assert conn.state is State.CLOSED


def test_quit_in_transaction_enters_update_then_closed():
    conn = authed()
    assert conn.send(Quit()) == b"QUIT\r\n"
    assert conn.state is State.UPDATE
    conn.receive_data(b"+OK dewey POP3 server signing off (maildrop empty)\r\n")
    assert isinstance(conn.next_event(), Ok)
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())


def test_c57_quit_err_is_distinct_outcome():
    # T-27: QUIT -ERR is its own outcome (C-57 flow).
    conn = authed()
    conn.send(Quit())
    conn.receive_data(b"-ERR some deleted messages not removed\r\n")
    ev = conn.next_event()
    assert isinstance(ev, Err) and isinstance(ev.command, Quit)
    assert conn.state is State.CLOSED


def test_t42_eof_after_quit_is_truncated():
    conn = authed()
    conn.send(Quit())
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.truncated


# --- C-33 / S-05 / T-41: STLS ---------------------------------------------------------


def test_c33_stls_blocks_sending_until_handshake():
    conn = greeted()
    conn.send(Stls())
    conn.receive_data(b"+OK Begin TLS negotiation\r\n")
    assert isinstance(conn.next_event(), Ok)
    with pytest.raises(LocalProtocolError, match="TLS"):
        conn.send(Capa())


def test_c33_stls_then_capa_after_handshake():
    conn = greeted()
    conn.send(Stls())
    conn.receive_data(b"+OK\r\n")
    conn.next_event()
    conn.start_tls_done()
    assert conn.send(Capa()) == b"CAPA\r\n"


@pytest.mark.parametrize("extra", [b"+OK injected\r\n", b"-ERR fake\r\n", b"x"])
def test_s05_data_after_stls_reply_is_injection(extra):
    conn = greeted()
    conn.send(Stls())
    conn.receive_data(b"+OK Begin TLS\r\n" + extra)
    with pytest.raises(RemoteProtocolError, match="injection"):
        conn.next_event()


# --- SASL exchange (C-39, C-40, T-35) ---------------------------------------------------


@pytest.mark.parametrize(
    ("line", "text"),
    [(b"+ cmVhbG09ImVsd29vZC5pbm5vc29mdC5jb20i\r\n", "cmVhbG09ImVsd29vZC5pbm5vc29mdC5jb20i"),
     (b"+\r\n", ""), (b"+ \r\n", ""), (b"+ go ahead\r\n", "go ahead")],
    ids=["base64", "bare-plus", "plus-space", "text"],
)
def test_sasl_continuations(line, text):
    conn = greeted()
    conn.send(Auth(mechanism="PLAIN"))
    conn.receive_data(line)
    assert conn.next_event() == Continuation(text=text)
    with pytest.raises(LocalProtocolError):
        greeted().send(AuthResponse(data="AA=="))
    assert conn.send(AuthResponse(data="AHVzZXIAcGFzcw==")) == b"AHVzZXIAcGFzcw==\r\n"
    conn.receive_data(b"+OK Logged in.\r\n")
    assert isinstance(conn.next_event(), Ok)
    assert conn.state is State.TRANSACTION


def test_sasl_cancel_and_err_stays_authorization():
    conn = greeted()
    conn.send(Auth(mechanism="LOGIN"))
    conn.receive_data(b"+ !!notbase64\r\n")
    conn.next_event()
    assert conn.send(AuthResponse(data="*")) == b"*\r\n"
    conn.receive_data(b"-ERR Authentication aborted\r\n")
    assert isinstance(conn.next_event(), Err)
    assert conn.state is State.AUTHORIZATION


def test_capa_listing_collected_and_capped():
    conn = greeted(max_listing=64)
    conn.send(Capa())
    conn.receive_data(b"+OK\r\n" + b"X-TAG\r\n" * 20 + b".\r\n")
    with pytest.raises(RemoteProtocolError, match="listing"):
        conn.next_event()


def test_t16_million_line_uidl_listing_in_64k_reads():
    # T-16: a 1,000,000-line UIDL arrives in socket-sized reads and parses completely;
    # the collected listing is capped in octets (S-12), not lines.
    lines = b"".join(b"%d u%07d\r\n" % (i, i) for i in range(1, 1_000_001))
    data = b"+OK\r\n" + lines + b".\r\n"
    conn = authed()
    conn.send(Uidl())
    events = feed(conn, [data[i : i + 65536] for i in range(0, len(data), 65536)])
    assert len(events) == 1 and isinstance(events[0], MultiLine)
    uids = parse_uidl(events[0].body)
    assert len(uids) == 1_000_000
    assert uids[0] == (1, "u0000001") and uids[-1] == (1_000_000, "u1000000")
    assert conn.outstanding == 0 and conn.buffered == 0
