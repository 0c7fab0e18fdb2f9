"""POP3 authentication: mechanism byte vectors, mechanism choice, refusal classification."""

from __future__ import annotations

import base64

import pytest
from mailpipe.plugins.pop3 import auth
from mailpipe.plugins.pop3.events import Capabilities, Err, Pass, parse_capa

from mailpipe import sasl
from mailpipe.errors import AuthenticationError, SourceBusyError, SourcePermanentError


def test_c16_apop_digest_rfc1939_example():
    digest = auth.apop_digest(b"<1896.697170952@dbc.mtview.ca.us>", "tanstaaf")
    assert digest == "c4c9334bac560ecc979e58001b3e22fb"


def test_c37_plain_initial_response():
    mech = auth.Plain(user="user", password="pass")
    assert auth.b64encode(mech.initial()) == "AHVzZXIAcGFzcw=="
    assert auth.b64encode(auth.Plain(user="test", password="test", authzid="test").initial()) == (
        "dGVzdAB0ZXN0AHRlc3Q="  # RFC 5034 §6
    )
    # Without an initial response, the (empty) first challenge gets the same answer.
    assert mech.respond(b"") == b"\0user\0pass"


def test_c37_initial_response_length_rule():
    assert auth.initial_response_fits("PLAIN", "A" * 200)
    assert not auth.initial_response_fits("PLAIN", "A" * 245)


def test_login_answers_user_then_password_then_cancels():
    mech = auth.Login(user="bob", password="secret")
    assert mech.initial() is None
    assert mech.respond(b"Username:") == b"bob"
    assert mech.respond(None) == b"secret"  # prompts are ignored (C-40)
    with pytest.raises(auth.SaslCancel):
        mech.respond(b"again?")


def test_cram_md5_rfc2195_example():
    mech = auth.CramMd5(user="tim", password="tanstaaftanstaaf")
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    assert mech.respond(challenge) == b"tim b913a602c7eda7a495b4e6e7334d3890"
    with pytest.raises(auth.SaslCancel):
        auth.CramMd5(user="tim", password="x").respond(None)  # undecodable: cancel


def test_c43_xoauth2_google_example_two_line():
    mech = auth.XOAuth2(user="someuser@example.com", token="ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
    first = mech.respond(b"")  # the empty "+ " after "AUTH XOAUTH2"
    assert auth.b64encode(first) == (
        "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
    )


def test_c44_xoauth2_error_challenge_answered_with_empty_line():
    mech = auth.XOAuth2(user="u@example.com", token="tok")
    mech.respond(b"")
    challenge = base64.b64decode(
        "eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ=="
    )
    assert mech.respond(challenge) == b""
    assert mech.error == {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}


def test_c45_oauthbearer_rfc7628_example_and_error_response():
    mech = auth.OAuthBearer(
        user="user@example.com", token="vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
        host="server.example.com", port=995,
    )
    assert auth.b64encode(mech.initial()) == (
        "bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9OTk1AWF1dGg9QmVhcmVyIHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
    )
    assert mech.respond(b"") == mech.initial()  # sent after an empty challenge
    assert auth.b64encode(mech.respond(b'{"status":"invalid_token"}')) == "AQ=="
    assert mech.error == {"status": "invalid_token"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", b""), ("cmVhbG0=", b"realm"), ("=AAA", None), ("AAA=BBB", None),
     ("!!notbase64", None), ("go ahead", None)],
)
def test_c39_strict_base64_challenges(text, expected):
    assert auth.b64decode_strict(text) == expected


DOVECOT_CAPA = parse_capa(
    b"CAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\nUSER\r\n"
    b"SASL PLAIN LOGIN\r\n"
)
GMAIL_CAPA = parse_capa(
    b"USER\r\nRESP-CODES\r\nEXPIRE 0\r\nLOGIN-DELAY 300\r\nTOP\r\nUIDL\r\nX-GOOGLE-RICO\r\n"
    b"SASL PLAIN XOAUTH2 OAUTHBEARER\r\n"
)
MS_CAPA = parse_capa(b"TOP\r\nUIDL\r\nSASL PLAIN XOAUTH2\r\nUSER\r\n")
SASL_ONLY = parse_capa(b"SASL PLAIN\r\n")
LOGIN_ONLY = parse_capa(b"SASL LOGIN\r\nTOP\r\n")


@pytest.mark.parametrize(
    ("setting", "caps", "password", "token", "stamp", "expected"),
    [
        ("auto", DOVECOT_CAPA, True, False, None, "plain"),
        ("auto", GMAIL_CAPA, False, True, None, "oauthbearer"),
        ("auto", MS_CAPA, False, True, None, "xoauth2"),
        ("auto", SASL_ONLY, True, False, None, "plain"),  # C-28: never USER here
        ("auto", LOGIN_ONLY, True, False, None, "login"),
        ("auto", None, True, False, None, "user"),  # C-26: no CAPA, RFC 1939 only
        ("auto", parse_capa(b"USER\r\nSASL CRAM-MD5\r\n"), True, False, None, "user"),
        ("apop", None, True, False, b"<1.2@h>", "apop"),
        ("cram-md5", parse_capa(b"SASL CRAM-MD5\r\n"), True, False, None, "cram-md5"),
        ("xoauth2", GMAIL_CAPA, False, True, None, "xoauth2"),
        ("user", DOVECOT_CAPA, True, False, None, "user"),
    ],
)
def test_c42_mechanism_choice(setting, caps, password, token, stamp, expected):
    assert auth.choose(setting, caps, has_password=password, has_token=token,
                       apop_timestamp=stamp) == expected


@pytest.mark.parametrize(
    ("setting", "caps", "password", "token", "stamp", "match"),
    [
        ("auto", DOVECOT_CAPA, True, True, None, "never falls back"),  # C-42 OAuth → password
        ("auto", parse_capa(b"SASL CRAM-MD5\r\n"), True, False, None, "explicitly"),
        ("apop", DOVECOT_CAPA, True, False, None, "APOP"),  # T-17
        ("user", SASL_ONLY, True, False, None, "USER"),  # C-28
        ("cram-md5", DOVECOT_CAPA, True, False, None, "downgrade"),  # S-09
        ("xoauth2", DOVECOT_CAPA, False, True, None, "XOAUTH2"),
    ],
)
def test_c42_no_silent_downgrade(setting, caps, password, token, stamp, match):
    with pytest.raises(SourcePermanentError, match=match):
        auth.choose(setting, caps, has_password=password, has_token=token,
                    apop_timestamp=stamp)


@pytest.mark.parametrize(
    ("text", "caps", "kind", "code", "retry"),
    [
        ("[AUTH] Authentication failed.", None, AuthenticationError, None, None),
        ("[IN-USE] Do you have another POP session running?", None, SourceBusyError, "IN-USE", None),
        ("[in-use] x", None, SourceBusyError, "IN-USE", None),
        ("maildrop already locked", None, SourceBusyError, "IN-USE", None),  # T-19
        ("[LOGIN-DELAY] wait 300s", None, SourceBusyError, "LOGIN-DELAY", 300.0),
        ("[LOGIN-DELAY] Minimum time between mail checks violation",
         parse_capa(b"LOGIN-DELAY 900\r\n"), SourceBusyError, "LOGIN-DELAY", 900.0),  # T-20
        ("[SYS/TEMP/FOO] busy", None, SourceBusyError, "SYS/TEMP", None),  # C-30
        ("[SYS/PERM] account disabled", None, SourcePermanentError, "SYS/PERM", None),
        ("Temporary problem", parse_capa(b"AUTH-RESP-CODE\r\n"), SourceBusyError, "SYS/TEMP", None),
        ("Invalid login", None, AuthenticationError, None, None),
        ("[REFERRAL/imap.example.net] Referral", None, AuthenticationError, None, None),  # S-13
    ],
)
def test_c31_refusals_classified(text, caps, kind, code, retry):
    err = Err(command=Pass(password="hunter22"), text=text, code=_code(text))
    error = auth.classify(err, host="pop.example.com:995", during="PASS", capabilities=caps)
    assert type(error) is kind
    assert "pop.example.com" in str(error) and "hunter22" not in str(error)
    if code is not None:
        assert error.code == code
    if retry is not None:
        assert error.retry_after == retry


def _code(text: str) -> str:
    from mailpipe.plugins.pop3.events import split_code

    return split_code(text)[0]


def test_classify_sanitises_server_text():
    err = Err(command=None, text="\x1b[31mevil\x07", code="")
    assert "\x1b" not in str(auth.classify(err, host="h", during="greeting"))


def test_capabilities_values():
    # C-29: EXPIRE 0, EXPIRE NEVER and the per-user EXPIRE n USER form.
    assert GMAIL_CAPA.expire == 0 and GMAIL_CAPA.login_delay == 300
    caps = parse_capa(b"EXPIRE NEVER\r\nLOGIN-DELAY 10 USER\r\n")
    assert caps.expire == -1 and caps.per_user("LOGIN-DELAY") and not caps.per_user("EXPIRE")
    assert Capabilities().expire is None
    zimbra = parse_capa(b"EXPIRE 5 USER\r\n")
    assert zimbra.expire == 5 and zimbra.per_user("EXPIRE")


# --- SCRAM (RFC 5802, RFC 7677) -------------------------------------------------------

SCRAM_SHA1 = [  # RFC 5802 §5, user "user", password "pencil"
    b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
    b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
    b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
    b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
]
SCRAM_SHA256 = [  # RFC 7677 §3, user "user", password "pencil"
    b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
]
SCRAM_VECTORS = [("SCRAM-SHA-1", SCRAM_SHA1), ("SCRAM-SHA-256", SCRAM_SHA256)]


def scram(name: str, vector: list[bytes]) -> auth.Scram:
    nonce = vector[0].split(b",r=")[1].decode()
    return auth.Scram(user="user", password="pencil", name=name, nonce=nonce)


@pytest.mark.parametrize(("name", "vector"), SCRAM_VECTORS, ids=["sha1", "sha256"])
def test_scram_rfc_example_with_initial_response(name, vector):
    mech = scram(name, vector)
    assert mech.initial() == vector[0]
    mech.initial_sent()
    assert mech.respond(vector[1]) == vector[2]
    assert mech.respond(vector[3]) == b""  # RFC 4422 §5: empty answer to success data
    assert mech.verified
    mech.success()


@pytest.mark.parametrize(("name", "vector"), SCRAM_VECTORS, ids=["sha1", "sha256"])
def test_scram_rfc_example_without_initial_response(name, vector):
    mech = scram(name, vector)
    mech.initial()  # computed but not sent (C-36: no SASL in CAPA)
    assert mech.respond(b"") == vector[0]  # the empty first challenge
    assert mech.respond(vector[1]) == vector[2]
    assert mech.respond(vector[3]) == b""
    assert mech.verified


@pytest.mark.parametrize(("name", "vector"), SCRAM_VECTORS, ids=["sha1", "sha256"])
def test_scram_bad_server_signature_fails(name, vector):
    mech = scram(name, vector)
    mech.initial_sent()
    mech.respond(vector[1])
    wrong = b"v=" + base64.b64encode(b"\x00" * (20 if name == "SCRAM-SHA-1" else 32))
    with pytest.raises(auth.SaslVerifyError, match="signature does not match"):
        mech.respond(wrong)
    assert not mech.verified
    with pytest.raises(auth.SaslVerifyError, match="no server signature"):
        mech.success()  # a +OK after that still fails


def test_scram_ok_without_server_final_fails():
    mech = scram("SCRAM-SHA-256", SCRAM_SHA256)
    mech.initial_sent()
    mech.respond(SCRAM_SHA256[1])
    with pytest.raises(auth.SaslVerifyError, match="no server signature"):
        mech.success()


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=XXXXNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # no server part
        b"r=xrOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    ],
    ids=["other-nonce", "no-server-part", "prefixed"],
)
def test_scram_server_nonce_must_extend_client_nonce(server_first):
    mech = scram("SCRAM-SHA-256", SCRAM_SHA256)
    mech.initial_sent()
    with pytest.raises(auth.SaslVerifyError, match="nonce"):
        mech.respond(server_first)


@pytest.mark.parametrize(
    ("server_first", "match"),
    [
        (b"m=ext,r=rOprNGfwEbeRWgbNEkqOx,s=QSXCR+Q6sek8bf92,i=4096", "extension"),
        (b"r=rOprNGfwEbeRWgbNEkqOx,i=4096,s=QSXCR+Q6sek8bf92", "r=, s=, i="),
        (b"r=rOprNGfwEbeRWgbNEkqOx,s=!!,i=4096", "salt"),
        (b"r=rOprNGfwEbeRWgbNEkqOx,s=QSXCR+Q6sek8bf92,i=0", "iteration"),
        (b"r=rOprNGfwEbeRWgbNEkqOx,s=QSXCR+Q6sek8bf92,i=2147483648", "iteration"),  # S-12
        ("r=rOprNGfwEbeRWgbNEkqOx,s=QSXCR+Q6sek8bf92,i=\u00b2".encode(), "iteration"),
        (b"garbage", "attribute"),
    ],
)
def test_scram_malformed_server_first_refused(server_first, match):
    mech = scram("SCRAM-SHA-256", SCRAM_SHA256)
    mech.initial_sent()
    with pytest.raises(auth.SaslVerifyError, match=match):
        mech.respond(server_first)


def test_scram_server_error_attribute():
    mech = scram("SCRAM-SHA-256", SCRAM_SHA256)
    mech.initial_sent()
    mech.respond(SCRAM_SHA256[1])
    with pytest.raises(auth.SaslVerifyError, match="invalid-proof"):
        mech.respond(b"e=invalid-proof")
    assert mech.error == {"e": "invalid-proof"}


def test_scram_saslname_escaping_and_random_nonce():
    mech = auth.Scram(user="a=b,c", password="p")
    first = mech.initial()
    assert first.startswith(b"n,,n=a=3Db=2Cc,r=")  # RFC 5802 §5.1
    nonce = first.split(b",r=")[1]
    assert len(nonce) >= 24 and b"," not in nonce
    assert mech.initial() == first  # stable once made
    assert auth.Scram(user="u", password="p").initial() != first


@pytest.mark.parametrize(
    ("text", "expected"),
    [("I\u00adX", "IX"), ("user", "user"), ("USER", "USER"), ("\u00aa", "a"),
     ("\u2168", "IX"), ("a\u00a0b", "a b")],  # RFC 4013 §3 examples, plus C.1.2 → SPACE
)
def test_saslprep_rfc4013_examples(text, expected):
    assert auth.saslprep(text) == expected


@pytest.mark.parametrize("text", ["\u0007", "\u0627\u0031"])  # RFC 4013 §3: errors
def test_saslprep_rfc4013_errors(text):
    with pytest.raises(ValueError):
        auth.saslprep(text)


def test_scram_password_is_saslprepped():
    plain = scram("SCRAM-SHA-256", SCRAM_SHA256)
    prepped = auth.Scram(user="user", password="pen\u00adcil", nonce=plain.nonce)
    for mech in (plain, prepped):
        mech.initial_sent()
    assert prepped.respond(SCRAM_SHA256[1]) == plain.respond(SCRAM_SHA256[1])


def test_scram_unknown_variant_refused():
    with pytest.raises(ValueError, match="SCRAM"):
        auth.Scram(user="u", password="p", name="SCRAM-MD5")


SCRAM_CAPA = parse_capa(b"USER\r\nSASL PLAIN LOGIN SCRAM-SHA-1 SCRAM-SHA-256\r\n")
SHA1_CAPA = parse_capa(b"USER\r\nSASL PLAIN SCRAM-SHA-1\r\n")


@pytest.mark.parametrize(
    ("setting", "caps", "expected"),
    [
        ("auto", SCRAM_CAPA, "scram-sha-256"),  # C-42: preferred when offered
        ("auto", SHA1_CAPA, "plain"),  # SCRAM-SHA-1 only when named
        ("scram-sha-1", SHA1_CAPA, "scram-sha-1"),
        ("scram-sha-256", SCRAM_CAPA, "scram-sha-256"),
        ("scram-sha-256", None, "scram-sha-256"),  # no CAPA: the server decides (C-36)
    ],
)
def test_c42_scram_choice(setting, caps, expected):
    assert auth.choose(setting, caps, has_password=True, has_token=False,
                       apop_timestamp=None) == expected


@pytest.mark.parametrize("setting", ["scram-sha-256", "scram-sha-1"])
def test_s09_pinned_scram_missing_is_refused(setting):
    with pytest.raises(SourcePermanentError, match="downgrade"):
        auth.choose(setting, DOVECOT_CAPA, has_password=True, has_token=False,
                    apop_timestamp=None)


def test_c42_oauth_token_still_wins_over_scram():
    caps = parse_capa(b"SASL SCRAM-SHA-256 XOAUTH2\r\n")
    assert auth.choose("auto", caps, has_password=True, has_token=True,
                       apop_timestamp=None) == "xoauth2"


def test_scram_salted_password_is_derived_once_per_salt_and_count(monkeypatch):
    # RFC 5802 §5.1: the client may cache SaltedPassword; a poll of several commit
    # windows then runs PBKDF2 once per (salt, iteration count), not once per login.
    import hashlib

    sasl.salted_password.cache_clear()
    calls: list[tuple[bytes, int]] = []
    real = hashlib.pbkdf2_hmac

    def counting(digest: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append((salt, iterations))
        return real(digest, password, salt, iterations)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    for _ in range(2):
        test_scram_rfc_example_with_initial_response("SCRAM-SHA-256", SCRAM_SHA256)
    assert len(calls) == 1
    # another salt (the server changed the password's record): derived again
    other = SCRAM_SHA256[1].replace(b"s=W22ZaJ0SNY7soEsUEjb6gQ==", b"s=QSXCR+Q6sek8bf92")
    mech = scram("SCRAM-SHA-256", SCRAM_SHA256)
    mech.initial_sent()
    mech.respond(other)
    assert len(calls) == 2
    sasl.salted_password.cache_clear()


def test_scram_a_worker_of_a_thousand_mailboxes_derives_each_once(monkeypatch):
    # Issue 18: a worker polls each of its mailboxes again and again, each with its
    # own salt; the cache holds them all (it held 16, and every login of every cycle
    # ran PBKDF2 again).
    import hashlib

    sasl.salted_password.cache_clear()
    calls: list[bytes] = []
    real = hashlib.pbkdf2_hmac

    def counting(digest: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append(salt)
        return real(digest, password, salt, iterations)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    for _cycle in range(3):
        for i in range(1000):
            sasl.salted_password("sha256", b"pw%d" % i, b"salt%d" % i, 2)
    assert len(calls) == 1000
    sasl.salted_password.cache_clear()


def test_scram_cache_keeps_no_plaintext_password_and_is_bounded():
    # The SaltedPassword cache is keyed by an HMAC of the password, never the
    # password, and holds at most maxsize entries.
    sasl.salted_password.cache_clear()
    password = b"pencil-plaintext-secret"
    for i in range(sasl.salted_password.maxsize + 4):
        sasl.salted_password("sha256", password, b"salt%d" % i, 2)
    entries = sasl.salted_password._entries
    assert len(entries) == sasl.salted_password.maxsize
    for key in entries:
        assert password not in key
        assert all(password not in part for part in key if isinstance(part, bytes))
    # the cached value is the real derivation
    import hashlib

    expected = hashlib.pbkdf2_hmac("sha256", password, b"salt5", 2)
    assert sasl.salted_password("sha256", password, b"salt5", 2) == expected
    sasl.salted_password.cache_clear()
