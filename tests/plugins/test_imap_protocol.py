"""Sans-I/O IMAP protocol: bytes ⇄ events, table-driven, no event loop.

Every server vector is fed whole, one byte at a time, at random split points, and
with trailing data after it (which must stay buffered); all must give the same events
(IC-10). Vectors come from the IMAP conformance checklist; their ids are cited.
"""

from __future__ import annotations

import ast
import itertools
import random
from pathlib import Path

import pytest
from mailpipe.plugins.imap import events as ev
from mailpipe.plugins.imap import mutf7
from mailpipe.plugins.imap.events import (
    Closed,
    Continuation,
    Data,
    Done,
    Greeting,
    Literal,
    LiteralChunk,
    LiteralEnd,
    LiteralStart,
    ResponseCode,
    Status,
)
from mailpipe.plugins.imap.protocol import (
    NEED_DATA,
    ImapConnection,
    LocalProtocolError,
    RemoteProtocolError,
    State,
)

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN] ready\r\n"


def splits(data: bytes) -> dict[str, list[bytes]]:
    """IC-10: whole, one byte at a time, and random split points (fixed seeds)."""
    modes = {"whole": [data], "bytewise": [data[i : i + 1] for i in range(len(data))]}
    for seed in (1, 2, 3):
        rnd = random.Random(seed)
        cuts = sorted(rnd.sample(range(1, len(data)), min(6, len(data) - 1)))
        bounds = [0, *cuts, len(data)]
        modes[f"random{seed}"] = [data[a:b] for a, b in itertools.pairwise(bounds)]
    return modes


def drain(conn: ImapConnection) -> list[object]:
    out: list[object] = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def merged(events: list[object]) -> list[object]:
    """Literal chunks joined, so that chunking by segmentation does not matter."""
    out: list[object] = []
    for e in events:
        if isinstance(e, LiteralChunk) and out and isinstance(out[-1], LiteralChunk):
            out[-1] = LiteralChunk(data=out[-1].data + e.data)
        else:
            out.append(e)
    return out


def selected(caps: bytes = b"IMAP4rev1 LITERAL+") -> ImapConnection:
    """A connection past greeting (A-tags used: A1 LOGIN, A2 SELECT)."""
    conn = ImapConnection()
    conn.receive_data(b"* OK [CAPABILITY " + caps + b"] ready\r\n")
    conn.send(ev.login("joe", "secret"))
    conn.send  # noqa: B018 - readability: LOGIN completes before SELECT
    conn.receive_data(b"A1 OK [CAPABILITY " + caps + b" UIDPLUS MOVE] in\r\n")
    drain(conn)
    conn.send(ev.select(b"INBOX"))
    conn.receive_data(b"* 3 EXISTS\r\nA2 OK [READ-WRITE] done\r\n")
    drain(conn)
    assert conn.state is State.SELECTED
    return conn


def run_all_ways(data: bytes, trailing: bytes = b"* 9 EXISTS\r\n") -> list[object]:
    """Feed ``data`` after a UID FETCH (tag A3) every way; all must agree; trailing
    data must stay a separate response."""
    results = []
    for name, pieces in splits(data).items():
        conn = selected()
        conn.send(ev.uid_fetch("1:*", "UID BODY.PEEK[]"))
        events: list[object] = []
        for piece in pieces:
            conn.receive_data(piece)
            events += drain(conn)
        results.append((name, merged(events)))
    first = results[0][1]
    for name, events in results:
        assert events == first, name
    conn = selected()
    conn.send(ev.uid_fetch("1:*", "UID BODY.PEEK[]"))
    conn.receive_data(data + trailing)
    assert merged(drain(conn)) == [*first, Data(name="EXISTS", number=9, values=())]
    return first


A = ev.Atom
FETCH_CMD = ev.uid_fetch("1:*", "UID BODY.PEEK[]")

CASES = [
    pytest.param(
        # IC-01: a counted literal inside a FETCH, then the tagged completion.
        b"* 12 FETCH (UID 900 BODY[] {12}\r\nHello\r\nWorld)\r\nA3 OK done\r\n",
        [
            LiteralStart(number=12, section="BODY[]", size=12),
            LiteralChunk(data=b"Hello\r\nWorld"),
            LiteralEnd(),
            Data(name="FETCH", number=12, values=((A("UID"), A("900"), A("BODY[]"),
                 Literal(12)),)),
            Done(tag="A3", command=FETCH_CMD, status="OK", code=None, text="done"),
        ],
        id="ic01-fetch-literal",
    ),
    pytest.param(
        # IT-01: protocol-shaped bytes inside a literal are data.
        b"* 1 FETCH (BODY[] {29}\r\nA3 OK no\r\n* BYE x\r\n{3}\r\nabc\n) UID 4)\r\n",
        [
            LiteralStart(number=1, section="BODY[]", size=29),
            LiteralChunk(data=b"A3 OK no\r\n* BYE x\r\n{3}\r\nabc\n)"),
            LiteralEnd(),
            Data(name="FETCH", number=1, values=((A("BODY[]"), Literal(29), A("UID"),
                 A("4")),)),
        ],
        id="it01-protocol-bytes-in-literal",
    ),
    pytest.param(
        # IC-01 POLICY: a lone LF ends a line outside literals; a lone CR is data.
        b"* 2 EXISTS\n* OK a\rb\r\n",
        [Data(name="EXISTS", number=2, values=()),
         Status(status="OK", code=None, text="a\rb")],
        id="ic01-bare-lf",
    ),
    pytest.param(
        # IC-02: case-insensitive status words and codes; empty resp-text.
        b"* ok [UIDNEXT 5] x\r\n* OK\r\n",
        [Status(status="OK", code=ResponseCode("UIDNEXT", "5"), text="x"),
         Status(status="OK", code=None, text="")],
        id="ic02-case-and-empty-text",
    ),
    pytest.param(
        # IC-04: quoted strings keep ")" and SP; only \" and \\ are escapes.
        b'* 4 FETCH (UID 70 X-GM-LABELS ("\\\\Sent" "a \\"b\\" (c)" Inbox))\r\n',
        [Data(name="FETCH", number=4, values=((A("UID"), A("70"), A("X-GM-LABELS"),
              (b"\\Sent", b'a "b" (c)', A("Inbox"))),))],
        id="ic04-quoted-labels",
    ),
    pytest.param(
        # IC-05: NIL is absent, "" is empty.
        b'* 7 FETCH (UID 3 BODY[] NIL)\r\n* 8 FETCH (UID 4 BODY[] "")\r\n',
        [Data(name="FETCH", number=7, values=((A("UID"), A("3"), A("BODY[]"), None),)),
         Data(name="FETCH", number=8, values=((A("UID"), A("4"), A("BODY[]"), b""),))],
        id="ic05-nil-vs-empty",
    ),
    pytest.param(
        # IC-24: SELECT data in any order, codes parsed.
        b"* 172 EXISTS\r\n* OK [UIDVALIDITY 3857529045] UIDs valid\r\n"
        b"* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] Limited\r\n",
        [Data(name="EXISTS", number=172, values=()),
         Status(status="OK", code=ResponseCode("UIDVALIDITY", "3857529045"),
                text="UIDs valid"),
         Status(status="OK", code=ResponseCode("PERMANENTFLAGS", "(\\Deleted \\Seen \\*)"),
                text="Limited")],
        id="ic24-select-data",
    ),
    pytest.param(
        # IC-29: header section streamed too; brackets with spaces are one atom;
        # small non-body literals are kept inline.
        b"* 5 FETCH (UID 9 RFC822.SIZE 44 BODY[HEADER.FIELDS (FROM)] {4}\r\nab\r\n"
        b" X-NAME {2}\r\nhi)\r\n",
        [
            LiteralStart(number=5, section="BODY[HEADER.FIELDS (FROM)]", size=4),
            LiteralChunk(data=b"ab\r\n"),
            LiteralEnd(),
            Data(name="FETCH", number=5, values=((A("UID"), A("9"), A("RFC822.SIZE"),
                 A("44"), A("BODY[HEADER.FIELDS (FROM)]"), Literal(4), A("X-NAME"),
                 b"hi"),)),
        ],
        id="ic29-sections-and-inline-literal",
    ),
    pytest.param(
        # IC-01: {0} literal, and a literal at the end of a response.
        b"* 6 FETCH (UID 10 BODY[] {0}\r\n)\r\n",
        [LiteralStart(number=6, section="BODY[]", size=0), LiteralEnd(),
         Data(name="FETCH", number=6, values=((A("UID"), A("10"), A("BODY[]"),
              Literal(0)),))],
        id="ic01-empty-literal",
    ),
    pytest.param(
        # IC-40: MOVE's COPYUID untagged before the EXPUNGEs.
        b"* OK [COPYUID 432432 42:44 1202:1204]\r\n* 22 EXPUNGE\r\n",
        [Status(status="OK", code=ResponseCode("COPYUID", "432432 42:44 1202:1204"),
                text=""),
         Data(name="EXPUNGE", number=22, values=())],
        id="ic40-copyuid-untagged",
    ),
]


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_responses_parsed_every_way(data: bytes, expected: list[object]) -> None:
    assert run_all_ways(data) == expected


def test_ic10_chunks_are_bounded_and_memory_is_not_held() -> None:
    conn = selected()
    conn.chunk_size = 1000
    conn.send(FETCH_CMD)
    body = b"x" * 10_000
    conn.receive_data(b"* 1 FETCH (BODY[] {10000}\r\n" + body + b")\r\n")
    events = drain(conn)
    chunks = [e for e in events if isinstance(e, LiteralChunk)]
    assert max(len(c.data) for c in chunks) == 1000
    assert b"".join(c.data for c in chunks) == body


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (GREETING, Greeting(status="OK", code=ResponseCode(
            "CAPABILITY", "IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN"), text="ready")),
        # IC-11: brackets later in the text are text (Exchange).
        (b"* OK The Microsoft Exchange IMAP4 service is ready. [TQBXAFcAMgA=]\r\n",
         Greeting(status="OK", code=None,
                  text="The Microsoft Exchange IMAP4 service is ready. [TQBXAFcAMgA=]")),
        (b"* OK Gimap ready for requests from 192.0.2.1 x2mb241876667wmk\r\n",
         Greeting(status="OK", code=None,
                  text="Gimap ready for requests from 192.0.2.1 x2mb241876667wmk")),
        (b"* PREAUTH IMAP4rev1 server logged in as joe\r\n",
         Greeting(status="PREAUTH", code=None,
                  text="IMAP4rev1 server logged in as joe")),
        (b"* BYE Too many connections\r\n",
         Greeting(status="BYE", code=None, text="Too many connections")),
    ],
    ids=["dovecot", "exchange", "gimap", "preauth", "bye"],
)
def test_ic11_greetings(line: bytes, expected: Greeting) -> None:
    for pieces in splits(line).values():
        conn = ImapConnection()
        events = []
        for piece in pieces:
            conn.receive_data(piece)
            events += drain(conn)
        assert events == [expected]
    states = {"PREAUTH": State.AUTHENTICATED, "BYE": State.LOGOUT}
    assert conn.state is states.get(expected.status, State.NOT_AUTHENTICATED)


@pytest.mark.parametrize(
    ("line", "named"),
    [(b"+OK POP3 ready\r\n", "POP3"), (b"220 mx ESMTP\r\n", "SMTP"),
     (b"\x16\x03\x01\x00\x05hello\r\n", "TLS")],
    ids=["pop3", "smtp", "tls"],
)
def test_ic11_wrong_protocol_named(line: bytes, named: str) -> None:
    conn = ImapConnection()
    conn.receive_data(line)
    with pytest.raises(RemoteProtocolError, match=named):
        conn.next_event()
    assert conn.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        conn.send(ev.capability())  # IC-11: never goes on to authenticate


@pytest.mark.parametrize(
    ("command", "wire"),
    [
        (ev.capability(), b"A1 CAPABILITY\r\n"),
        # IC-06: always quoted, \ and " escaped.
        (ev.login("joe", 'p"a\\ss'), b'A1 LOGIN "joe" "p\\"a\\\\ss"\r\n'),
        (ev.login("", "x"), b'A1 LOGIN "" "x"\r\n'),
        (ev.authenticate("PLAIN", "AGpvZQBww6Rzcw=="),
         b"A1 AUTHENTICATE PLAIN AGpvZQBww6Rzcw==\r\n"),
        (ev.authenticate("PLAIN", ""), b"A1 AUTHENTICATE PLAIN =\r\n"),
        (ev.id_command({"name": "mailpipe", "version": "1"}),
         b'A1 ID ("name" "mailpipe" "version" "1")\r\n'),
    ],
    ids=["capability", "login-quoted", "login-empty", "auth-ir", "auth-empty-ir", "id"],
)
def test_ic03_command_wire_bytes(command: ev.Command, wire: bytes) -> None:
    conn = ImapConnection()
    conn.receive_data(b"* OK hi\r\n")
    drain(conn)
    assert conn.send(command) == wire


def test_ic03_selected_commands_wire_bytes() -> None:
    conn = selected()
    assert conn.send(ev.uid_search("UID 124:*")) == b"A3 UID SEARCH UID 124:*\r\n"
    assert conn.send(ev.uid_fetch("1:3,7", "UID RFC822.SIZE BODY.PEEK[]")) == (
        b"A4 UID FETCH 1:3,7 (UID RFC822.SIZE BODY.PEEK[])\r\n"
    )
    assert conn.send(ev.uid_store("101:103", "+FLAGS.SILENT", ["\\Deleted"])) == (
        b"A5 UID STORE 101:103 +FLAGS.SILENT (\\Deleted)\r\n"  # IC-37
    )
    assert conn.send(ev.uid_expunge("101:103")) == b"A6 UID EXPUNGE 101:103\r\n"
    assert conn.send(ev.uid_move("42:44", b"Processed")) == (
        b'A7 UID MOVE 42:44 "Processed"\r\n'  # IC-40
    )
    assert conn.send(ev.uid_copy("42", b"Processed")) == b'A8 UID COPY 42 "Processed"\r\n'


def test_ic07_synchronizing_literal_waits_for_continuation() -> None:
    conn = ImapConnection()
    conn.receive_data(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    drain(conn)
    assert conn.send(ev.login("joe", "päss")) == b'A1 LOGIN "joe" {5}\r\n'
    assert conn.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        conn.send(ev.noop())  # the continuation round is not over (IC-07)
    conn.receive_data(b"* OK still there\r\n+ Ready for literal data\r\n")
    assert drain(conn) == [Status(status="OK", code=None, text="still there")]
    assert conn.data_to_send() == b"p\xc3\xa4ss\r\n"
    conn.receive_data(b"A1 OK LOGIN completed\r\n")
    assert [type(e) for e in drain(conn)] == [Done]
    assert conn.state is State.AUTHENTICATED


def test_ic07_refused_literal_sends_nothing_more() -> None:
    conn = ImapConnection()
    conn.receive_data(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    drain(conn)
    conn.send(ev.login("joe", "päss"))
    conn.receive_data(b"A1 BAD Literal too big\r\n")
    (done,) = drain(conn)
    assert isinstance(done, Done) and done.status == "BAD"
    assert conn.data_to_send() == b""
    assert conn.state is State.NOT_AUTHENTICATED
    assert conn.send(ev.capability()) == b"A2 CAPABILITY\r\n"


@pytest.mark.parametrize(
    ("caps", "password", "wire"),
    [
        (b"LITERAL+", "päss", b'A1 LOGIN "joe" {5+}\r\np\xc3\xa4ss\r\n'),
        (b"LITERAL-", "päss", b'A1 LOGIN "joe" {5+}\r\np\xc3\xa4ss\r\n'),
        (b"LITERAL-", "ä" * 2500, b'A1 LOGIN "joe" {5000}\r\n'),
        (b"IMAP4rev1", "päss", b'A1 LOGIN "joe" {5}\r\n'),
    ],
    ids=["literal-plus", "literal-minus-small", "literal-minus-5000", "none"],
)
def test_ic08_non_synchronizing_literal_only_when_advertised(
    caps: bytes, password: str, wire: bytes
) -> None:
    conn = ImapConnection()
    conn.receive_data(b"* OK [CAPABILITY IMAP4rev1 " + caps + b"] hi\r\n")
    drain(conn)
    assert conn.send(ev.login("joe", password)) == wire


def test_ic02_unknown_tag_fails_the_connection() -> None:
    conn = selected()
    conn.send(FETCH_CMD)
    conn.receive_data(b"Z9 OK done\r\n")
    with pytest.raises(RemoteProtocolError, match="unknown tag"):
        conn.next_event()
    assert conn.state is State.ERROR


def test_ic02_unexpected_continuation_fails() -> None:
    conn = selected()
    conn.receive_data(b"+ Ready\r\n")
    with pytest.raises(RemoteProtocolError, match="continuation"):
        conn.next_event()


@pytest.mark.parametrize("line", [b"+\r\n", b"+ Ready\r\n", b"+ idling\r\n"])
def test_ic02_continuations_during_idle(line: bytes) -> None:
    conn = selected()
    assert conn.send(ev.idle()) == b"A3 IDLE\r\n"
    conn.receive_data(line)
    (event,) = drain(conn)
    assert isinstance(event, Continuation)
    with pytest.raises(LocalProtocolError):
        conn.send(ev.noop())  # IP-03: nothing but DONE while idling
    assert conn.send_done() == b"DONE\r\n"
    conn.receive_data(b"A3 OK Idle completed\r\n")
    assert [type(e) for e in drain(conn)] == [Done]


def test_ic09_number_ranges() -> None:
    assert ResponseCode("UIDVALIDITY", "4294967295").number() == 2**32 - 1
    with pytest.raises(ValueError, match="range"):
        ResponseCode("UIDVALIDITY", "4294967296").number()
    with pytest.raises(ValueError):
        ev.parse_number("1e3")
    assert ev.parse_number("18446744073709551615", limit=2**64 - 1) == 2**64 - 1


def test_ic10_huge_search_result() -> None:
    conn = selected()
    conn.send(ev.uid_search("ALL"))
    data = b"* SEARCH " + b" ".join(b"%d" % i for i in range(1, 300_001)) + b"\r\n"
    conn.receive_data(data + b"A3 OK\r\n")
    search, done = drain(conn)
    assert isinstance(search, Data) and isinstance(done, Done)
    assert ev.search_uids(search.values) == list(range(1, 300_001))


def test_ic10_response_without_crlf_fails_at_cap_bounded() -> None:
    conn = ImapConnection(max_response=4096)
    conn.receive_data(GREETING)
    drain(conn)
    for _ in range(3):
        conn.receive_data(b"x" * 1000)
        assert conn.next_event() is NEED_DATA
    conn.receive_data(b"x" * 2000)
    with pytest.raises(RemoteProtocolError, match="4096"):
        conn.next_event()


def test_ic31_eof_inside_literal_is_an_error() -> None:
    conn = selected()
    conn.send(FETCH_CMD)
    conn.receive_data(b"* 1 FETCH (BODY[] {100}\r\npartial")
    conn.receive_data(b"")
    events = []
    with pytest.raises(RemoteProtocolError, match="inside a literal"):
        while True:
            events.append(conn.next_event())
    assert events[0] == LiteralStart(number=1, section="BODY[]", size=100)


def test_eof_between_responses_is_closed() -> None:
    conn = selected()
    conn.receive_data(b"* BYE shutting down\r\n")
    conn.receive_data(b"")
    assert drain(conn) == [Status(status="BYE", code=None, text="shutting down"),
                           Closed()]
    assert conn.state is State.LOGOUT


def test_ic12_capabilities_belong_to_a_phase() -> None:
    conn = ImapConnection()
    conn.receive_data(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n")
    drain(conn)
    assert conn.capabilities == {"IMAP4REV1", "STARTTLS", "LOGINDISABLED"}
    conn.send(ev.starttls())
    conn.receive_data(b"A1 OK [CAPABILITY IMAP4rev1 FORGED] Begin TLS\r\n")
    drain(conn)
    assert conn.capabilities is None  # IC-12 MUST: nothing pre-TLS survives
    conn.send(ev.capability())
    conn.receive_data(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nA2 OK\r\n")
    drain(conn)
    assert conn.capabilities == {"IMAP4REV1", "AUTH=PLAIN"}
    # Gmail: untagged CAPABILITY during AUTHENTICATE is the post-auth list.
    conn.send(ev.authenticate("PLAIN", "AGpvZQBzZWNyZXQ="))
    conn.receive_data(b"* CAPABILITY IMAP4rev1 UIDPLUS MOVE\r\nA3 OK Success\r\n")
    drain(conn)
    assert conn.capabilities == {"IMAP4REV1", "UIDPLUS", "MOVE"}


def test_ic12_login_without_new_list_forgets_old_one() -> None:
    conn = ImapConnection()
    conn.receive_data(GREETING)
    drain(conn)
    conn.send(ev.login("joe", "x"))
    conn.receive_data(b"A1 OK Logged in\r\n")
    drain(conn)
    assert conn.capabilities is None


def test_ic13_commands_checked_against_state() -> None:
    conn = ImapConnection()
    conn.receive_data(GREETING)
    drain(conn)
    with pytest.raises(LocalProtocolError, match="not allowed"):
        conn.send(ev.select(b"INBOX"))
    conn.send(ev.login("joe", "x"))
    conn.receive_data(b"A1 NO [AUTHENTICATIONFAILED] bad\r\n")
    (done,) = drain(conn)
    assert done.code == ResponseCode("AUTHENTICATIONFAILED", "")
    assert conn.state is State.NOT_AUTHENTICATED


def test_ic13_failed_select_leaves_selected_state() -> None:
    conn = selected()
    conn.send(ev.select(b"Missing"))
    conn.receive_data(b"A3 NO [NONEXISTENT] Mailbox doesn't exist\r\n")
    drain(conn)
    assert conn.state is State.AUTHENTICATED


def test_is07_injection_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError):
        ev.login("joe\r\nA9 DELETE INBOX", "x")
    with pytest.raises(ValueError):
        ev.select(b"INBOX\r\nA9 LOGOUT")
    with pytest.raises(ValueError):
        ev.Atom("1:* (FLAGS)\r\nA9 LOGOUT")
    with pytest.raises(ValueError):
        ev.uid_search("ALL  UID 1")  # IC-03: one SP between tokens


def test_is12_secrets_not_in_repr() -> None:
    assert "s3cr3t" not in repr(ev.login("joe", "s3cr3t"))
    assert "c2VjcmV0" not in repr(ev.authenticate("PLAIN", "c2VjcmV0"))


@pytest.mark.parametrize(
    ("uids", "wire"),
    [([1], "1"), ([3, 1, 2], "1:3"), ([1, 2, 3, 7, 9, 10], "1:3,7,9:10"),
     ([4294967295], "4294967295")],
)
def test_ic34_uid_sets(uids: list[int], wire: str) -> None:
    assert ev.uid_set(uids) == wire


def test_ic34_uid_set_refuses_zero_and_empty() -> None:
    with pytest.raises(ValueError):
        ev.uid_set([0, 1])
    with pytest.raises(ValueError):
        ev.uid_set([])
    sets = ev.split_uid_sets(range(1, 20_000, 2), max_len=500)
    assert all(len(s) <= 500 + 64 * 11 for s in sets)
    assert sum(len(s.split(",")) for s in sets) == 10_000


def test_ic40_copyuid_parsed() -> None:
    code = ResponseCode("COPYUID", "432432 42:44 1202:1204")
    assert ev.copyuid(code) == (432432, {42: 1202, 43: 1203, 44: 1204})
    assert ev.copyuid(ResponseCode("COPYUID", "19 42 7")) == (19, {42: 7})


@pytest.mark.parametrize(
    ("display", "wire"),
    [
        ("Entwürfe", b"Entw&APw-rfe"),
        ("Gelöschte Elemente", b"Gel&APY-schte Elemente"),
        ("Tom & Jerry", b"Tom &- Jerry"),
        ("~peter/mail/台北/日本語", b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("Réponses 1200+1201", b"R&AOk-ponses 1200+1201"),
        ("📧 Inbox", b"&2D3c5w- Inbox"),
    ],
)
def test_ic23_modified_utf7(display: str, wire: bytes) -> None:
    assert mutf7.encode(display) == wire
    assert mutf7.decode(wire) == display


def test_ic23_malformed_names_refused() -> None:
    with pytest.raises(ValueError):
        mutf7.decode(b"&Jjo!")
    with pytest.raises(ValueError):
        mutf7.decode(b"&AGEAYgBj-")  # printable ASCII encoded


def test_protocol_imports_no_io() -> None:
    path = Path(ev.__file__).with_name("protocol.py")
    tree = ast.parse(path.read_text())
    names = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [node])
        for alias in ([alias] if isinstance(node, ast.Import) else [])
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not names & {"asyncio", "socket", "ssl"}
