"""The fake server's SASL mechanisms as a machine apart from the session: each
exchange is driven through a scripted ``challenge`` and ends in an Outcome."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from mailpipe.testing.sasl import Granted, Refused, SaslServer

USERS = {"alice": "s3cret"}
TOKENS = {"alice": "tok-1"}
STAMP = "<1.2@mailpipe.test>"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def server(answers: list[str | None]) -> tuple[SaslServer, list[str]]:
    """A SaslServer whose client gives ``answers`` in turn; the challenges are kept."""
    asked: list[str] = []
    script = iter(answers)

    async def challenge(text: str) -> str | None:
        asked.append(text)
        return next(script)

    return SaslServer(challenge, USERS, TOKENS, STAMP), asked


def cram(password: str) -> str:
    digest = hmac.new(password.encode(), STAMP.encode(), hashlib.md5).hexdigest()
    return b64(f"alice {digest}")


@pytest.mark.parametrize(
    ("mechanism", "initial", "answers", "outcome"),
    [
        ("PLAIN", b64("\0alice\0s3cret"), [], Granted("alice")),
        ("PLAIN", b64("\0alice\0wrong"), [],
         Refused("[AUTH] invalid user name or password")),
        ("PLAIN", b64("bob\0alice\0s3cret"), [],
         Refused("[AUTH] authorization identity not allowed")),
        ("PLAIN", None, [None], None),  # cancelled with "*": answered by the session
        ("LOGIN", None, [b64("alice"), b64("s3cret")], Granted("alice")),
        ("CRAM-MD5", None, [cram("s3cret")], Granted("alice")),
        ("CRAM-MD5", None, [cram("wrong")], Refused("[AUTH] authentication failed")),
        ("CRAM-MD5", b64("x"), [], Refused("[AUTH] CRAM-MD5 takes no initial response")),
        ("XOAUTH2", b64("user=alice\x01auth=Bearer tok-1\x01\x01"), [], Granted("alice")),
        ("XOAUTH2", b64("user=alice\x01auth=Bearer bad\x01\x01"), [""],
         Refused("[AUTH] invalid token")),
        ("OAUTHBEARER", b64("n,a=alice,\x01auth=Bearer tok-1\x01\x01"), [],
         Granted("alice")),
    ],
    ids=lambda v: v if isinstance(v, str) and v.isupper() else None,
)
async def test_mechanism_outcome(
    mechanism: str, initial: str | None, answers: list[str | None], outcome: object
) -> None:
    sasl, _ = server(answers)
    assert await sasl.authenticate(mechanism, initial) == outcome


async def test_cram_md5_challenge_is_the_greeting_timestamp() -> None:
    sasl, asked = server([cram("s3cret")])
    await sasl.authenticate("CRAM-MD5", None)
    assert asked == [b64(STAMP)]


async def test_bearer_failure_sends_an_error_challenge_first() -> None:
    sasl, asked = server([""])
    await sasl.authenticate("OAUTHBEARER", b64("n,a=alice,\x01auth=Bearer no\x01\x01"))
    assert [base64.b64decode(a) for a in asked] == [
        b'{"status": "invalid_token", "scope": "mail"}'
    ]


async def test_malformed_response_raises_for_the_session_to_answer() -> None:
    sasl, _ = server([])
    with pytest.raises(ValueError):
        await sasl.authenticate("PLAIN", b64("no separators"))
