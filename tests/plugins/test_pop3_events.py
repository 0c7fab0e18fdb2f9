"""POP3 pure parsers: CAPA, STAT, LIST, UIDL, response codes, APOP timestamps."""

from __future__ import annotations

import pytest
from mailpipe.plugins.pop3.events import (
    apop_timestamp,
    code_class,
    parse_capa,
    parse_list,
    parse_list_one,
    parse_stat,
    parse_uidl,
    parse_uidl_one,
    split_code,
)


def test_c23_capa_dovecot_prelogin():
    caps = parse_capa(
        b"CAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\nUSER\r\n"
        b"SASL PLAIN LOGIN\r\n"
    )
    assert caps.names == {"CAPA", "TOP", "UIDL", "RESP-CODES", "PIPELINING",
                          "AUTH-RESP-CODE", "STLS", "USER", "SASL"}
    assert caps.sasl == ("PLAIN", "LOGIN")
    assert "pipelining" in caps


def test_c23_capa_multi_token_and_case():
    caps = parse_capa(b"IMPLEMENTATION Courier Mail Server\r\nsasl plain\r\nX-GOOGLE-RICO\r\n")
    assert caps.args["IMPLEMENTATION"] == ("Courier", "Mail", "Server")
    assert caps.sasl == ("PLAIN",)
    assert "X-GOOGLE-RICO" in caps  # T-33: unknown tags kept, no error


def test_mpop14_capa_token_at_end_without_crlf():
    assert parse_capa(b"SASL PLAIN XOAUTH2\r").sasl == ("PLAIN", "XOAUTH2")
    assert parse_capa(b"SASL PLAIN XOAUTH2").sasl == ("PLAIN", "XOAUTH2")


def test_t34_long_capa_line_accepted():
    mechs = " ".join(f"MECH{i}" for i in range(100)).encode()
    assert len(parse_capa(b"SASL " + mechs + b"\r\n").sasl) == 100


def test_capa_8bit_does_not_raise():
    assert "X-\ufffd" in parse_capa(b"X-\xff\r\n").names  # poplib raises here (§6.1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2 320", (2, 320)), ("2 320 extra info", (2, 320)), ("0 0", (0, 0))],
)
def test_c48_stat(text, expected):
    assert parse_stat(text) == expected


@pytest.mark.parametrize("text", ["two 320", "", "2"])
def test_c48_stat_malformed(text):
    with pytest.raises(ValueError):
        parse_stat(text)


def test_c49_list():
    assert parse_list(b"1 120\r\n2 200\r\n") == [(1, 120), (2, 200)]
    assert parse_list(b"2 200\r\n") == [(2, 200)]  # gaps after DELE
    assert parse_list(b"1 120 \r\n") == [(1, 120)]  # T-43
    assert parse_list(b"1 5000000000\r\n") == [(1, 5_000_000_000)]  # never clamp
    assert parse_list_one("1 120") == (1, 120)
    with pytest.raises(ValueError):
        parse_list(b"x y\r\n")


def test_c53_uidl():
    assert parse_uidl(b"1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7\r\n") == [
        (1, "whqtswO00WBw418f9t5JxYwZ"), (2, "QhdPYR:00WBw1Ph7x7")]
    assert parse_uidl_one("2 QhdPYR:00WBw1Ph7x7") == "QhdPYR:00WBw1Ph7x7"
    assert parse_uidl_one("QhdPYR:00WBw1Ph7x7") == "QhdPYR:00WBw1Ph7x7"  # twisted#9104


def test_t23_t24_t43_uidl_edge_cases():
    assert parse_uidl(b"1 abc\r\n2 abc\r\n") == [(1, "abc"), (2, "abc")]  # duplicates kept
    assert parse_uidl(b"1 " + b"u" * 200 + b"\r\n") == [(1, "u" * 200)]
    assert parse_uidl(b"1 \x80\x81\r\n") == [(1, "\x80\x81")]  # bytes survive (latin-1)
    assert parse_uidl(b"1 \r\n2 b\r\n") == [(2, "b")]  # empty uid: no uid for message 1
    assert parse_uidl(b"1 abc \r\n") == [(1, "abc")]


def test_t08_listings_split_on_the_session_newline():
    assert parse_list(b"1 120\n2 200 \n", b"\n") == [(1, 120), (2, 200)]
    assert parse_uidl(b"1 abc\n2 d\r\n", b"\n") == [(1, "abc"), (2, "d")]  # optional CR
    # CRLF sessions are unchanged: a bare LF is not a line end (§0.2).
    assert parse_uidl(b"1 abc\n2 def\r\n") == [(1, "abc\n2 def")]


@pytest.mark.parametrize(
    ("text", "code", "cls"),
    [("[SYS/TEMP/FOO] busy", "SYS/TEMP/FOO", "SYS/TEMP"), ("[in-use] x", "IN-USE", "IN-USE"),
     ("[REFERRAL/imap.example.net] Referral", "REFERRAL/IMAP.EXAMPLE.NET", ""),
     ("no code", "", ""), ("[AUTH] Authentication failed.", "AUTH", "AUTH"),
     ("[LOGIN-DELAY] wait", "LOGIN-DELAY", "LOGIN-DELAY"), ("[SYS/PERM]", "SYS/PERM", "SYS/PERM")],
)
def test_c30_response_codes(text, code, cls):
    assert split_code(text)[0] == code
    assert code_class(code) == cls


@pytest.mark.parametrize(
    ("greeting", "stamp"),
    [
        (b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>",
         b"<1896.697170952@dbc.mtview.ca.us>"),
        (b"+OK Gpop ready for requests from 124.168.132.215 q5pf21484907pbh.7", None),
        (b"+OK <>", None), (b"+OK hi <a b@c>", None), (b"+OK <nodomain>", None),
        (b"+OK <server.x> ready <1.2@host>", None),  # T-18: first '<' wins
        (b"+OK <a@b", None), (b"+OK <a@@b>", None), (b"+OK <@b>", None),
    ],
)
def test_c15_apop_timestamp(greeting, stamp):
    assert apop_timestamp(greeting) == stamp


def test_s12_apop_timestamp_scan_is_linear():
    # CVE-2018-1060: a hostile greeting must not make the scan backtrack.
    assert apop_timestamp(b"+OK " + b"<" * 100_000 + b"@" * 100_000) is None


_FIELDLESS = ("Capa", "Stls", "Utf8", "Stat", "List", "Uidl", "Retr", "Dele", "Noop",
              "Rset", "Quit")


@pytest.mark.parametrize("name", _FIELDLESS)
def test_a_command_without_fields_of_its_own_is_its_base_dataclass(name):
    """Issue 18: no second ``@dataclass`` pass at start-up for a command that adds no
    field; it is still a frozen, slotted value of its own class."""
    import dataclasses

    from mailpipe.plugins.pop3 import events

    cls = getattr(events, name)
    base = cls.__mro__[1]
    assert "__init__" not in vars(cls) and "__eq__" not in vars(cls)
    assert vars(cls)["__slots__"] == ()
    assert dataclasses.fields(cls) == dataclasses.fields(base)
    kwargs = {"number": 3} if dataclasses.fields(cls) else {}
    value = cls(**kwargs)
    assert not hasattr(value, "__dict__")
    assert repr(value) == f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    assert value == cls(**kwargs) and hash(value) == hash(cls(**kwargs))
    others = [getattr(events, n)(**kwargs) for n in _FIELDLESS if n != name
              and dataclasses.fields(getattr(events, n)) == dataclasses.fields(cls)]
    assert others and all(value != other for other in others)
    if kwargs:
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.number = 4  # type: ignore[misc]
    assert value.to_bytes().startswith(cls.keyword)
